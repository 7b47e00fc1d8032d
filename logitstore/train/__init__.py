"""Training students from stores: distillation losses and co-distillation."""
