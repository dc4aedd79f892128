"""tuneserve: a self-hosted LoRA fine-tuning service with an OpenAI-compatible API."""
