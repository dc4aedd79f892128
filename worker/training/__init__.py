"""The LoRA training engine: spec -> tokenized, packed data -> PEFT adapter, with callbacks."""
