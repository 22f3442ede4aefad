"""Where and what runs: model loading (hub, local, embedded GGUF), device and precision placement, processes."""
