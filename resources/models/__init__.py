"""Model layer: where weights come from (hub, folder, tiny pack), how they load, LoRA stacks."""
