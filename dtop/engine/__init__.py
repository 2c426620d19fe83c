"""Training and evaluation."""
from .evaluate import evaluate, intersection_union, predict, run_evaluation, summary_table
from .losses import atm_loss, pixel_ce_loss, segmentation_loss
from .train import train

__all__ = ["train", "evaluate", "predict", "run_evaluation", "summary_table", "intersection_union",
           "segmentation_loss", "atm_loss", "pixel_ce_loss"]
