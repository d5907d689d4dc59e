"""Fine-tuning: adapt a SAM 2 model to a department's own annotated volumes (issue 8).

    from medsam2.finetune import FinetuneSettings, finetune
    result = finetune(FinetuneSettings("Task09_Spleen", out="runs/spleen", model="medsam2-latest",
                                       labels=("spleen",), epochs=20, steps=200))
    predictor, entry = medsam2.models.registry.load_model(checkpoint=result.best_path)

Modules: data (datasets, checks, split, prompted clips), forward (SAM 2's tracking with gradients),
heads (SRPP and boundary heads, training only), losses, trainer (the loop, resume, DDP), validation,
export (the engine checkpoint), curves, cli_finetune (``medsam2 finetune``).
"""

from medsam2.finetune.export import export_checkpoint
from medsam2.finetune.settings import FinetuneResult, FinetuneSettings
from medsam2.finetune.trainer import finetune

__all__ = ["FinetuneResult", "FinetuneSettings", "export_checkpoint", "finetune"]
