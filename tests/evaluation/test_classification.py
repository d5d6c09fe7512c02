import itertools
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainkit.config import get_cfg
from trainkit.data import DatasetCatalog, build_test_loader, build_train_loader, load_digits
from trainkit.evaluation import ClassificationEvaluator, inference_on_dataset
from trainkit.modeling import build_model

# Four samples, three classes; the label's rank among the logits is 1, 2, 3 and 2.
LOGITS = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
LABELS = torch.tensor([1, 1, 0, 2])


def test_exact_topk_on_a_hand_built_example_over_two_batches():
    evaluator = ClassificationEvaluator(topk=(1, 2, 3, 5))
    evaluator.process({"label": LABELS[:2]}, {"logits": LOGITS[:2]})
    evaluator.process({"label": LABELS[2:]}, {"logits": LOGITS[2:]})
    assert evaluator.num_samples == 4
    assert evaluator.evaluate() == {"classification": {"top1": 25.0, "top2": 75.0, "top3": 100.0, "top5": 100.0}}


def test_reset_forgets_and_no_samples_gives_no_results():
    evaluator = ClassificationEvaluator()
    evaluator.process({"label": LABELS}, {"logits": LOGITS})
    evaluator.reset()
    assert evaluator.num_samples == 0
    assert evaluator.evaluate() == {}
    evaluator.process({"label": LABELS[:1]}, {"logits": LOGITS[:1]})
    assert evaluator.evaluate() == {"classification": {"top1": 100.0, "top5": 100.0}}


def test_bad_shapes_and_topk_are_clear_errors():
    with pytest.raises(ValueError, match=r"got logits \(4, 3\) and labels \(3,\)"):
        ClassificationEvaluator().process({"label": LABELS[:3]}, {"logits": LOGITS})
    with pytest.raises(ValueError, match=r"topk=\(0,\)"):
        ClassificationEvaluator(topk=(0,))


def make_cfg():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATASETS.TRAIN = ("digits_train",)
    cfg.SOLVER.IMS_PER_BATCH = 32
    cfg.SEED = 0
    return cfg


def train(model, cfg, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in itertools.islice(build_train_loader(cfg), steps):
        loss = model(batch)["loss_cls"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture
def one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_trained_mlp_classifies_digits_well(one_thread):
    torch.manual_seed(0)
    cfg = make_cfg()
    model = train(build_model(cfg), cfg, 600)
    results = inference_on_dataset(model, build_test_loader(cfg, "digits_test"), ClassificationEvaluator("digits_test"))
    assert results["classification"]["top1"] > 90.0
    assert results["classification"]["top5"] > 99.0


def register_odd_test_set():
    # 359 samples: the two processes get uneven shards (180 and 179).
    DatasetCatalog.register("digits_test_359", lambda: torch.utils.data.Subset(load_digits("test"), range(359)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate(model, cfg):
    evaluator = ClassificationEvaluator("digits_test_359", topk=(1, 2, 5))
    results = inference_on_dataset(model, build_test_loader(cfg, "digits_test_359", batch_size=16), evaluator)
    return results, evaluator.num_samples


def _eval_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        register_odd_test_set()
        cfg = make_cfg()
        model = build_model(cfg)
        model.load_state_dict(torch.load(f"{out_dir}/model.pt", weights_only=True))
        results, num_samples = evaluate(model, cfg)
        torch.save({"results": results, "num_samples": num_samples}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_result(tmp_path, one_thread):
    torch.manual_seed(0)
    cfg = make_cfg()
    model = train(build_model(cfg), cfg, 15)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    register_odd_test_set()
    try:
        expected, num_samples = evaluate(model, cfg)
    finally:
        DatasetCatalog.remove("digits_test_359")
    assert num_samples == 359
    assert 20.0 < expected["classification"]["top1"] < 95.0  # a partly trained model: not trivially 0 or 100
    # fork, not spawn: the children need no fresh interpreter and start in milliseconds instead of seconds.
    mp.start_processes(_eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["num_samples"] for r in ranks] == [180, 179]
    assert ranks[0]["results"] == expected
    assert ranks[1]["results"] == {}
