"""Layer-wise training with the fused SVP local loss: trainer, block-split models, datasets, memory.

    trainer = LayerwiseTrainer(mlp((1, 8, 8), 10), method="svp", p=0.1)
    losses = trainer.train_step(inputs, targets)      # every block updates on its own local loss
    config = recipe_config("mnist", method="bp")      # a dataset's recipe, any field overridden
"""

from .data import DATASETS, Dataset, batch_indices, load_dataset
from .memory import MemoryReport, PeakMemoryMeter, measure_step_memory
from .models import BlockwiseModel, mlp, vgg11, vit
from .run import RECIPES, TrainConfig, memory_depth_rows, recipe_config, run_training
from .seeds import block_step_seed
from .trainer import LayerwiseTrainer, StepLosses

__all__ = ["DATASETS", "RECIPES", "BlockwiseModel", "Dataset", "LayerwiseTrainer", "MemoryReport", "PeakMemoryMeter",
           "StepLosses", "TrainConfig", "batch_indices", "load_dataset", "measure_step_memory", "memory_depth_rows",
           "mlp", "block_step_seed", "recipe_config", "run_training", "vgg11", "vit"]
