"""Training machinery shared by pretraining and distillation: accelerate set-up, EMA scopes,
atomic checkpoints with exact resume, data position, logging and alarms."""
