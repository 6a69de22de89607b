"""`bequest lifelong`: pre-training through a stream of domains (ELLE, Qin et al. 2022; docs/methods.md, section 6).

Domains arrive in order. Stage k trains on domain k; before it, for `method: elle`, the model is grown
(any `bequest.grow` operator, per the grow schedule), a function-recovering warm-up trains it on the
memory of the earlier domains, and then it learns the new domain with memory replay
(`bequest.engine.replay`): every batch holds exactly round(replay_fraction * batch_size) blocks drawn
from a bounded memory (memory_size random training blocks kept per earlier domain); a fraction that
rounds to no block is refused. The baselines in the same command (`METHODS` in recipe.py): `naive`
(fixed size, no replay), `replay` (replay only), `grow` (growth only) and `rewarm` (Ibrahim et al. 2024:
replay, and at every domain a learning rate re-warmed linearly from lr_floor x lr to lr over `warmup` steps
and re-decayed by a cosine to lr_floor x lr at the stage's end, `schedule.rewarm_factor`; the other methods
restart the engine's own schedule, warm-up from 0 and cosine to 0, at every stage).

The stream's domains are domains of `corpus` (the default stdlib corpus, or the packages corpus of the
installed packages' docstrings; 'a+b' trains on two domains as one) or paths to the user's files.

Domain prompts: one special token per domain, `<|domain:NAME|>`, added to the tokenizer up front (so
the vocabulary never changes mid-stream). Every block of that domain is fed as [prompt, t1 .. tL]. The
prompt's row of the token embedding is the learned prompt vector, so it is saved, reloaded
(`from_pretrained`) and grown like any other row, and exact growth still preserves the function. Use it
when fine-tuning on a domain's tasks by prepending `prompt_id(tokenizer, domain)`. Prompted or not, the
same tokens are scored: t2 .. tL (the prompt and t1 carry no label), so perplexities compare across
methods.

Metrics, after every stage k (domains d_0 .. d_k seen), with ppl_j(k) the validation perplexity of
domain j after stage k (exp of the mean token NLL over its first eval_blocks blocks):
  AP(k)  = mean over j <= k of ppl_j(k)
  AP+(k) = mean over j < k of (ppl_j(k) - ppl_j(j)); None at k = 0 (no earlier domain)
Perplexities of every domain are also taken right after growth (`ppl_grown`): with exact growth they equal
the previous stage's.

Outputs: OUT/stage{k}-{domain}/ (HF folders; lineage parent = the previous stage), OUT/metrics.json,
OUT/ap.png (AP and AP+ per stage) and OUT/domains.png (each domain's perplexity per stage). Resumable
stage by stage: a finished stage is loaded on rerun, an unfinished one starts over.

Equal budgets: `budget_flops` sets each stage's steps from the engine's FLOP count of the model it
trains (warm-up included), so a grown model gets fewer steps for the same FLOPs per domain.

Modules: recipe (LifelongRecipe, METHODS), schedule (growth and step counts), prompts (domain prompts,
encoded blocks), metrics (perplexity, AP/AP+, plots), run (`lifelong` and what it needs).
"""

from bequest.grow.spec import SIZES, next_shape, parse_schedule
from bequest.lifelong.metrics import perplexity, plot, stage_metrics
from bequest.lifelong.prompts import encode, prompt_id, prompt_token
from bequest.lifelong.recipe import METHODS, LifelongRecipe
from bequest.lifelong.run import RewarmTrainer, WindowTrainer, lifelong
from bequest.lifelong.schedule import rewarm_factor

__all__ = ["METHODS", "SIZES", "LifelongRecipe", "RewarmTrainer", "WindowTrainer", "encode", "lifelong", "next_shape",
           "parse_schedule", "perplexity", "plot", "prompt_id", "prompt_token", "rewarm_factor", "stage_metrics"]
