"""Evaluation: the seed papers' protocols (prompts simulated from the ground truth, propagation through
the volume) and metrics (Dice, IoU, NSD, HD95 in mm) on any labelled dataset.

    from medsam2.evaluation import open_dataset, evaluate_dataset, EvaluationSettings, PromptProtocol
    dataset = open_dataset("Task09_Spleen", labels=["spleen"])
    settings = EvaluationSettings(PromptProtocol(prompt="box", slice_choice="middle"), intensity="abdomen")
    run = evaluate_dataset(dataset, predictor, "results/spleen-box", settings, model="MedSAM2_latest")
    print(run.report.summary_md.read_text())

Modules: metrics (numpy/scipy only), surface_dice (DeepMind's surfel NSD), columns, datasets,
protocols, cvpr25 (the CVPR 2025 interactive protocol) and cvpr25_report, references, runner, report,
cli_evaluate.
"""

from medsam2.datasets.layouts import EvaluationDataset, LabelSpec, open_dataset
from medsam2.evaluation.metrics import SegmentationMetrics, compute_metrics
from medsam2.evaluation.protocols import PromptProtocol
from medsam2.evaluation.runner import EvaluationRun, evaluate_dataset
from medsam2.evaluation.settings import EvaluationSettings

__all__ = [
    "EvaluationDataset",
    "EvaluationRun",
    "EvaluationSettings",
    "LabelSpec",
    "PromptProtocol",
    "SegmentationMetrics",
    "compute_metrics",
    "evaluate_dataset",
    "open_dataset",
]
