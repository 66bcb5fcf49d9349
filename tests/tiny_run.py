"""The overrides of a tiny-model training run that the trainer's tests share: the suite's random model on one-digit
additions, 2 prompts x 4 samples of 8 tokens a step (each test adds its MLflow and samples-table settings)."""

TINY = [
    "model.name=tiny",
    "data.level=add1",
    "data.n_train=64",
    "data.n_eval=4",
    "rollout.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=8",
    "algorithm.micro_batch_size=4",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "reward.dynamic_sampling=false",  # a random model gets every answer wrong: no group would be kept
]
