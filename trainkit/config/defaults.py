"""The default configuration.

Names and default values follow detectron2 where detectron2 has the key. Keys that trainkit adds are marked
``# trainkit:`` with a line on what they do. Every key a config file sets must exist here: an unknown key is an
error that names the nearest valid one.
"""
from yacs.config import CfgNode as _YacsNode

__all__ = ["_C"]

_C = _YacsNode()
_C.VERSION = 2

_C.MODEL = _YacsNode()
_C.MODEL.DEVICE = "cuda"
_C.MODEL.WEIGHTS = ""
# trainkit: detectron2's default "GeneralizedRCNN" does not exist here; the built-in MLP is the default.
_C.MODEL.META_ARCHITECTURE = "MLPClassifier"
# trainkit: number of classes of the built-in classifiers.
_C.MODEL.NUM_CLASSES = 10
# trainkit: how several processes train: "ddp" (DistributedDataParallel: every process holds the whole model) or
# "fsdp" (torch's fully_shard: each process holds a shard of the parameters, gradients and optimizer state;
# checkpoints become sharded folders). See docs/distributed.md.
_C.MODEL.PARALLEL = "ddp"
_C.MODEL.FSDP = _YacsNode()
# trainkit: class names of the submodules that fully_shard shards on their own (then the root); empty: every
# child of the root module that holds parameters.
_C.MODEL.FSDP.WRAP_CLASSES = []
# trainkit: the built-in MLPClassifier. Inputs are flattened to IN_FEATURES values.
_C.MODEL.MLP = _YacsNode()
_C.MODEL.MLP.IN_FEATURES = 64
_C.MODEL.MLP.HIDDEN_DIMS = [128, 128]
_C.MODEL.MLP.DROPOUT = 0.0
# trainkit: the built-in ConvNetClassifier (3x3 conv + ReLU per entry of CHANNELS, then a linear head).
_C.MODEL.CONVNET = _YacsNode()
_C.MODEL.CONVNET.IN_CHANNELS = 1
_C.MODEL.CONVNET.CHANNELS = [32, 64]
_C.MODEL.CONVNET.DROPOUT = 0.25
# trainkit: compile the model with torch.compile (nn.Module.compile, in place, before the DDP wrapper). The
# first steps then take longer (compilation); checkpoints are the same as without it. Needs a C++ compiler on
# CPU (Triton on GPU): where compilation cannot work, the run stops at start with an error naming this key.
_C.MODEL.COMPILE = False
# trainkit: torch.compile's mode: "default", "reduce-overhead", "max-autotune" or "max-autotune-no-cudagraphs".
_C.MODEL.COMPILE_MODE = "default"
# trainkit: torch.compile's backend: "inductor" (generates fused kernels), or "aot_eager" / "eager" to look
# for a compilation problem without code generation (no speed-up).
_C.MODEL.COMPILE_BACKEND = "inductor"

# trainkit: random augmentation of training images (the digits data set uses it).
_C.INPUT = _YacsNode()
_C.INPUT.AUGMENT = _YacsNode()
_C.INPUT.AUGMENT.ENABLED = False
# Largest shift, in pixels, of a random translation.
_C.INPUT.AUGMENT.MAX_SHIFT = 1

_C.DATASETS = _YacsNode()
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()

_C.DATALOADER = _YacsNode()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"

_C.SOLVER = _YacsNode()
# trainkit: "SGD" or "AdamW" (case-insensitive).
_C.SOLVER.OPTIMIZER = "SGD"
# trainkit: AdamW's (beta1, beta2); SGD ignores them.
_C.SOLVER.BETAS = (0.9, 0.999)
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.BASE_LR_END = 0.0
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (30000,)
_C.SOLVER.NUM_DECAYS = 3
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.RESCALE_INTERVAL = False
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# trainkit: keep only the newest N periodic checkpoints that the run wrote (model_final and files the run did
# not write are never deleted); 0 keeps them all.
_C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
# trainkit: write periodic and final checkpoints in a background thread; training stalls only while the state
# is copied to host memory (docs/checkpoints.md, "Async saves"). Off by default: on a CPU-only host the writer
# slows the steps it overlaps by about as much as the stall it saves, and it keeps one extra copy of the state
# in RAM; turn it on when the step runs on a GPU (benchmarks/README.md, checkpoint.py). With MODEL.PARALLEL fsdp
# this is torch.distributed.checkpoint.async_save.
_C.SOLVER.CHECKPOINT_ASYNC = False
_C.SOLVER.IMS_PER_BATCH = 16
# trainkit: gradient accumulation: micro-batches per optimizer step. IMS_PER_BATCH stays the batch of one
# optimizer step over all processes, so each process loads IMS_PER_BATCH / (processes * GRAD_ACCUM_STEPS)
# samples at a time: raising it lowers the memory a step needs, not what it computes. An iteration (MAX_ITER,
# the LR schedule, the periods) is one optimizer step.
_C.SOLVER.GRAD_ACCUM_STEPS = 1
_C.SOLVER.REFERENCE_WORLD_SIZE = 0
_C.SOLVER.BIAS_LR_FACTOR = 1.0
_C.SOLVER.WEIGHT_DECAY_BIAS = None
_C.SOLVER.CLIP_GRADIENTS = _YacsNode()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
# "value" (clamp each element), "norm" (each parameter's gradient norm, as in detectron2) or, trainkit:
# "full_model" (the total norm of all gradients together, like torch.nn.utils.clip_grad_norm_ over the model).
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
_C.SOLVER.AMP = _YacsNode()
_C.SOLVER.AMP.ENABLED = False
# trainkit: "float16" (with a GradScaler) or "bfloat16" (no scaler; also works on CPU).
_C.SOLVER.AMP.PRECISION = "float16"
# trainkit: every LOG_PERIOD iterations the pending metrics move to the host in one transfer (and are reduced
# across processes) and the writers write. 1 gives detectron2's per-step behaviour.
_C.SOLVER.LOG_PERIOD = 20

_C.TEST = _YacsNode()
_C.TEST.EVAL_PERIOD = 0
# Recompute the BatchNorm statistics over NUM_ITER training batches before each evaluation (hooks.PreciseBN;
# a no-op for a model without BatchNorm).
_C.TEST.PRECISE_BN = _YacsNode()
_C.TEST.PRECISE_BN.ENABLED = False
_C.TEST.PRECISE_BN.NUM_ITER = 200

# trainkit: an exponential moving average of the weights (hooks.EMAHook), updated after every optimizer step
# and saved in checkpoints.
_C.MODEL_EMA = _YacsNode()
# trainkit: keep the average.
_C.MODEL_EMA.ENABLED = False
# trainkit: the weight of the old average in each update, in [0, 1].
_C.MODEL_EMA.DECAY = 0.999
# trainkit: updates over which the decay ramps up linearly from 0 to DECAY (0: no warm-up).
_C.MODEL_EMA.WARMUP_ITERS = 0
# trainkit: evaluate the averaged weights (training continues on the raw ones); False evaluates the raw ones.
_C.MODEL_EMA.USE_FOR_EVAL = True

# Distributed training: how long the processes wait to meet (and for each collective) before a clear error.
_C.DIST = _YacsNode()
_C.DIST.TIMEOUT_S = 600

# trainkit: the writers of DefaultTrainer's PeriodicWriter, by name: "json" (OUTPUT_DIR/metrics.json),
# "tensorboard" (event files in OUTPUT_DIR), "console" (log lines with ETA), "csv" (OUTPUT_DIR/metrics.csv),
# "mlflow" (pip install trainkit[mlflow]) and "wandb" (pip install trainkit[wandb]); see docs/events.md.
_C.WRITERS = ["json", "tensorboard", "console"]

_C.OUTPUT_DIR = "./output"
_C.SEED = -1
_C.CUDNN_BENCHMARK = False
