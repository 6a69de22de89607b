"""`bequest upgrade`: every adapter and fine-tune of one model onto its successor (continued, grown or
independently trained), the path chosen from their lineage."""

from bequest.upgrade.recipe import PATHS, UpgradeRecipe
from bequest.upgrade.run import upgrade

__all__ = ["PATHS", "UpgradeRecipe", "upgrade"]
