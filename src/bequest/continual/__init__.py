"""`bequest learn`: continual fine-tuning through a stream of tasks, without forgetting (docs/methods.md, section 5).

One model is fine-tuned on the tasks one after another; every task is evaluated once before the first
(the `initial` row) and again after each task, which fills the accuracy matrix R[i][j] (accuracy on task j
after training task i). From them: the average accuracy after the last task, the last task's accuracy,
backward transfer (BWT), forward transfer (FWT) and forgetting (`metrics.continual_metrics` defines each).

A task is an embedded one (`domain`, `kind`, ...) or the user's labelled files (a .jsonl/.csv/.parquet
file, or a folder with train and validation files), read as `bequest finetune --data` reads them and named
after the file's stem or the folder; the two mix freely in one stream.

How labels are predicted (`--classify`):
- `head` (every family): ONE classification head over the union of all the tasks' labels, each task's
  labels at their own offset (`domain:text`, ..., `kind:module`, ...). Training restricts every
  example's softmax to its own task's labels and evaluation takes the argmax inside the task's range, so
  the head rows of a task receive no gradient from any other task: it behaves as one head per task
  (task-incremental learning) while a replayed batch can mix tasks freely. The body is shared, so what
  one task changes there is what another forgets. Heads are never masked: their rows belong to their task.
- `generate` (causal families): the LM continues `TEXT\\nTASK:` with the label's name; evaluation ranks the
  task's label names by their summed log-likelihood (rank classification) and takes the best.

Methods (`METHODS` in recipe.py): `seq` (plain sequential fine-tuning), `migu` (the MIGU mask from the
second task on, `bequest.engine.migu`; `--threshold` is the FRACTION of each layer's output rows masked,
not a magnitude), `replay` (rehearsal, `bequest.engine.replay`: a bounded memory of earlier tasks'
training examples, mixed into each later task's training set so that a `--replay-fraction` of the
examples are replayed), `migu+replay`, and `random-mask` (as many rows masked as MIGU, chosen at random:
the ablation). `--scope all` masks embeddings, norms and biases too (the paper leaves them free; in full
fine-tuning they carry much of what is forgotten). Full fine-tuning or LoRA (`--lora`: the LoRA A and B
matrices are trained and masked, base weights frozen, the head trained in full). Each task is one run of
the engine (fresh AdamW and schedule); an interrupted stream starts again from its first task.

Modules: recipe (LearnRecipe, METHODS, the task list), tasks (tasks as data), evaluate (accuracy), metrics (ACC,
BWT, FWT, forgetting, heat map), run (`learn` and the model, Trainer and output it needs).
"""

from bequest.continual.metrics import continual_metrics, heatmap
from bequest.continual.recipe import METHODS, LearnRecipe
from bequest.continual.run import TaskTrainer, learn
from bequest.continual.tasks import Task

__all__ = ["METHODS", "LearnRecipe", "Task", "TaskTrainer", "continual_metrics", "heatmap", "learn"]
