"""What a person runs after training: generate, the web demo, publish to the Hub, and the machine check (doctor)."""
