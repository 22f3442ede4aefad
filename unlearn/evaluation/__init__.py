"""Measuring a model: multiple-choice, generation, ROUGE and perplexity measures, the open-answer judge, collapse
checks and the bootstrap statistics behind every interval."""
