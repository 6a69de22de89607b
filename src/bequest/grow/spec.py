"""What a growth asks for: `GrowSpec` (target sizes, operators, their settings) and `target_shape`,
the validated sizes it comes to for a given source model; and the size grammar growth schedules are
written in (`parse_schedule`, `parse_grow_at`, `next_shape`).

    spec = GrowSpec(hidden=1024, layers=24, width="exact", depth="identity")
    spec = GrowSpec.from_recipe(recipe, sizes, seed=recipe.seed + k)  # any recipe with GrowFields
    target_shape(anatomy(model), spec)  # {"hidden", "heads", "kv_heads", "ffn", "layers"}; raises if impossible
    parse_schedule("hidden+32,layers*2;layers=6")  # [[("hidden", "+", 32), ("layers", "*", 2)], [("layers", "=", 6)]]
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from bequest.anatomy import Anatomy
from bequest.errors import BequestError

SIZES = ("hidden", "heads", "kv_heads", "ffn", "layers")


@dataclass(frozen=True)
class GrowSpec:
    """Target sizes (None: as the source, heads following hidden at the same head size) and how to get
    there: WIDTH[width], DEPTH[depth] with new blocks at `placement`, N(0, noise^2) on expanded
    tensors, `seed` for every random draw. Operator names are checked on construction."""

    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    layers: int | None = None
    width: str = "exact"
    depth: str = "identity"
    placement: str = "even"
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        from bequest.grow import depth, width  # they register their operators on import

        width.check(self.width)
        depth.check(self.depth)

    @classmethod
    def from_recipe(cls, recipe, sizes: dict, seed: int | None = None) -> GrowSpec:
        """From a recipe's GrowFields (width, depth, placement, noise) and `sizes` (keys of SIZES);
        `seed` defaults to the recipe's."""
        how = {k: getattr(recipe, k) for k in ("width", "depth", "placement", "noise")}
        return cls(**sizes, **how, seed=recipe.seed if seed is None else seed)

    def sizes(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in SIZES}


def target_shape(anat: Anatomy, spec: GrowSpec) -> dict:
    """The validated target sizes; unspecified sizes stay, heads follow hidden at the same head size."""
    hd = anat.head_dim
    coupled = anat.hidden == anat.heads * hd  # else head_dim is a free setting (Llama-like configs)
    hidden = anat.hidden if spec.hidden is None else spec.hidden
    heads = spec.heads
    if heads is None:
        heads = hidden // hd if coupled and hidden % hd == 0 else anat.heads
    group = anat.heads // anat.kv_heads
    gqa = "kv_heads" in anat.family.config_keys
    kv_heads = spec.kv_heads
    if kv_heads is None:
        kv_heads = heads // group if heads % group == 0 else anat.kv_heads
    elif not gqa and kv_heads != heads:
        raise BequestError(f"{anat.family.name} has no grouped KV heads; drop --kv-heads")
    target = {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads if gqa else heads,
        "ffn": anat.ffn if spec.ffn is None else spec.ffn,
        "layers": anat.layers if spec.layers is None else spec.layers,
    }
    for key, new in target.items():
        old = getattr(anat, key)
        if new < old:
            flag = "--" + key.replace("_", "-")
            raise BequestError(f"{flag} {new} is smaller than the source's {old}; growth only adds, pass >= {old}")
    if coupled and hidden != heads * hd:
        fix = f"pass --heads {hidden // hd}" if hidden % hd == 0 else f"pick --hidden a multiple of {hd}"
        raise BequestError(f"--hidden {hidden} with --heads {heads} changes the head size {hd}; {fix}")
    if heads % target["kv_heads"]:
        raise BequestError(f"--kv-heads {target['kv_heads']} must divide --heads {heads}")
    if heads // target["kv_heads"] < group:
        raise BequestError(
            f"--kv-heads {target['kv_heads']} would shrink the KV group size {group}; "
            f"keep heads / kv-heads >= {group}"
        )
    return target


# ---------------------------------------------------------------- the size grammar of growth schedules

Growth = list[tuple[str, str, int]]  # one growth: (size, '+' | '*' | '=', n) per size it changes


def parse_growth(text: str) -> Growth:
    """'hidden+32, layers*2' -> [("hidden", "+", 32), ("layers", "*", 2)]: add, multiply by, or set a size."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*([+*=])\s*(\d+)", item)
        if not m or m[1] not in SIZES:
            raise ValueError(f"{item!r} is not KEY+N, KEY*N or KEY=N with KEY one of {', '.join(SIZES)}")
        out.append((m[1], m[2], int(m[3])))
    return out


def parse_schedule(text: str) -> list[Growth]:
    """'hidden+32,layers+1;layers=6' -> one growth per ';'-separated part."""
    return [parse_growth(part) for part in text.split(";")]


def parse_grow_at(text: str) -> list[tuple[int, Growth]]:
    """'200:layers*2,400:layers*2' -> [(200, [("layers", "*", 2)]), (400, ...)]: growths at optimizer steps.
    Items are comma-separated; an item's sizes run to the next 'STEP:', so '200:hidden+32,layers+1' is one."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    if not parts or not re.match(r"\d+\s*:", parts[0]):
        raise ValueError(f"{text!r} is not STEP:SIZES items like '200:layers*2,400:layers*2'")
    items = []
    for part in parts:
        m = re.fullmatch(r"(\d+)\s*:(.*)", part)
        if m:
            items.append((int(m[1]), [m[2]]))
        else:
            items[-1][1].append(part)
    out = []
    for step, sizes in items:
        growth = parse_growth(",".join(sizes))
        if not growth:
            raise ValueError(f"step {step} names no sizes; write it like '{step}:layers*2'")
        out.append((step, growth))
    return out


def resized(value: int, op: str, n: int) -> int:
    return value + n if op == "+" else value * n if op == "*" else n


def next_shape(anat, growth: Growth) -> dict:
    """The target sizes of one growth from a model of `anat`'s sizes; the MLP keeps its ratio to the
    hidden size unless it is set."""
    shape = {k: getattr(anat, k) for k in SIZES}
    for key, op, n in growth:
        shape[key] = resized(shape[key], op, n)
    if not any(k == "ffn" for k, _, _ in growth):
        shape["ffn"] = anat.ffn * shape["hidden"] // anat.hidden
    if not any(k in ("heads", "kv_heads") for k, _, _ in growth):  # let grow keep the head size and group
        shape.pop("heads"), shape.pop("kv_heads")
    return shape
