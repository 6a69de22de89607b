"""`bequest demo [OUT] [--quick]`: the story of a model family on the embedded data in seven stages, every
trained weight passed on and the savings measured in that very run.

1. pre-train a small GPT-2, G1;
2. tune adapters (LoRA, IA3) and a full fine-tune of G1, each on another embedded task;
3. continue G1's pre-training on a new domain (G1') and `upgrade` the zoo onto it, against fresh tuning;
4. grow G1 into G2 with its function kept (the measured max |Δ logits|), train G2 with G1 as its teacher
   (growth + KI) against the same shape from scratch: FLOPs to reach scratch's final loss;
5. `upgrade` the zoo onto G2 along the growth maps, against fresh tuning;
6. `learn` a task stream on G2 with MIGU against sequential fine-tuning: average accuracy, forgetting;
7. draw the family tree (`bequest lineage`).

OUT gets report.md and a self-contained report.html (bequest.report). The demo is an orchestrator above
the verbs: the one module that calls their run functions, which nothing imports. Every stage writes verb
output folders, each whole or not at all; a finished stage is recorded in OUT/demo.json and skipped on a
rerun, so a killed demo resumes where it stopped (a killed verb resumes from its own checkpoints).
"""

from bequest.demo.run import DemoRecipe, demo

__all__ = ["DemoRecipe", "demo"]
