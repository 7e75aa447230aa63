"""The Ray Train + DeepSpeed runner shared by every stage.

A stage supplies a :class:`raystages.train.stage.Stage` (model, loss, export); the runner
owns everything else: the TorchTrainer, DeepSpeed, schedules, checkpoints, resume,
evaluation, metrics and the final Hugging Face export.
"""
