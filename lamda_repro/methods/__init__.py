"""Fine-tuning methods: full fine-tuning, peft baselines and LaMDA."""
