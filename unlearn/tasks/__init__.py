"""What a benchmark hands the toolkit: examples and multiple-choice questions, batches, token scoring, and the
`Task` protocol with its registry."""
