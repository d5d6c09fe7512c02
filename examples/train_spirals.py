"""Your own data set, model and evaluator, trained by a DefaultTrainer subclass: two interleaved spirals.

    python examples/train_spirals.py [SOLVER.MAX_ITER 2000 OUTPUT_DIR output/spirals_long]   # seconds on a CPU
"""
import torch
import torch.nn.functional as F
from torch import nn

from trainkit.config import get_cfg
from trainkit.data import DatasetCatalog, DatasetFromTensors
from trainkit.engine import DefaultTrainer, default_argument_parser, default_setup
from trainkit.evaluation import DatasetEvaluator
from trainkit.modeling import MODEL_REGISTRY


def spirals(n: int, seed: int) -> DatasetFromTensors:
    """``n`` noisy points of two interleaved spirals in the plane, labelled by spiral (0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3 * torch.pi
    angle = t + torch.pi * label
    point = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], 1) / 10 + 0.02 * torch.randn(n, 2, generator=g)
    return DatasetFromTensors(point=point, label=label)


DatasetCatalog.register("spirals_train", lambda: spirals(2000, seed=0))
DatasetCatalog.register("spirals_test", lambda: spirals(500, seed=1))


@MODEL_REGISTRY.register()
class SpiralNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg.MODEL.MLP.HIDDEN_DIMS[0]
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, batch):
        logits = self.net(batch["point"])
        if not self.training:
            return {"logits": logits}
        return {"loss_cls": F.cross_entropy(logits, batch["label"])}


class SpiralAccuracy(DatasetEvaluator):
    def reset(self):
        self.correct, self.total = 0, 0

    def process(self, inputs, outputs):
        self.correct += int((outputs["logits"].argmax(1) == inputs["label"]).sum())
        self.total += len(inputs["label"])

    def evaluate(self):
        return {"spirals": {"accuracy": 100.0 * self.correct / self.total}}  # logged as spirals/accuracy


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return SpiralAccuracy()


def main():
    args = default_argument_parser().parse_args()
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "SpiralNet", "MODEL.DEVICE", "cpu", "MODEL.MLP.HIDDEN_DIMS", "[64]",
                         "DATASETS.TRAIN", "('spirals_train',)", "DATASETS.TEST", "('spirals_test',)",
                         "DATALOADER.NUM_WORKERS", "0", "SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.01",
                         "SOLVER.IMS_PER_BATCH", "64", "SOLVER.MAX_ITER", "600", "SOLVER.STEPS", "(400,)",
                         "SOLVER.WARMUP_ITERS", "20", "SOLVER.CHECKPOINT_PERIOD", "300", "TEST.EVAL_PERIOD", "300",
                         "SEED", "0", "OUTPUT_DIR", "output/spirals", *args.opts])
    cfg.freeze()
    default_setup(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    print(main())  # {'spirals': {'accuracy': ...}}
