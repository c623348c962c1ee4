"""Every bad input answered: the user-facing contract of all subcommands, as one table.

Each case builds the user's files under ``tmp_path/user`` (tiny copies of the real data in
tests/data, checkpoints, earlier outputs), runs ``main([...])`` and checks:

* the exit code: 2 for bad input (argparse usage errors included), 130 for an interrupt;
* exactly one error line, on one line, saying what is wrong (the expected words);
* no traceback anywhere in the logs or on the console;
* the user's files unchanged (every file under ``user/`` hashed before and after).

Models are tiny settings of the real ones: ``--checkpoint none --image_size 256 --model_type
vit_t`` on 128 px crops (``em4``, conftest.py). Every command-level bad input lives here, in one
table: the command tests (test_train.py, test_evaluate.py, ...) hold the runs that work.
A refused ``evaluate`` leaves nothing at all under ``out`` (it checks everything before it
creates its output directory), and no refused command leaves a ``summary.json``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import SMALL, tiny_sam

import main as main_module
from samlora.training import trainer

FAST_TRAIN = [*SMALL, "--freeze_encoder", "--lora_targets", "decoder", "--lora_rank", "2", "--lora_alpha", "2",
              "--max_objects", "2", "--no_augment", "--val_fraction", "0.25"]
HTML = b"<html><body>404 Not Found</body></html>\n"  # what a failed download leaves behind


# --------------------------------------------------------------------------------------------
# Fixtures: tiny real data, one thread, the console stream restored
# --------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `one_thread`, `main`, `em4`: conftest.py


@pytest.fixture(scope="module")
def vit_b_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAM ViT-B state dict: every ViT-B tensor name (12 blocks), the tiny SAM's widths."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_01ec64.pth"
    torch.save(tiny_sam("vit", image_size=256, depth=12).state_dict(), path)
    return path


@dataclass
class Env:
    """Where a case puts things: ``user`` (hashed: must not change) and ``out`` (fresh)."""

    user: Path
    out: Path
    em4: Path  # four 128 px crops of real EM sections (conftest.py)
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    after: list[Callable[[], None]] = field(default_factory=list)  # extra checks after the run
    words: list[str] = field(default_factory=list)  # more words for the error line, known once built

    @property
    def vit_b(self) -> Path:
        """A vit_b checkpoint file (made once, when a case first needs it)."""
        return self.request.getfixturevalue("vit_b_keys")

    def fixture(self, name: str) -> Path:
        """Another fixture, made only when a case needs it (e.g. ``untrained_yolo``)."""
        return self.request.getfixturevalue(name)

    def data(self, name: str = "em") -> Path:
        """A copy of the four EM crops in ``user/<name>``."""
        return Path(shutil.copytree(self.em4, self.user / name))

    def file(self, name: str, content: bytes) -> Path:
        path = self.user / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def leaves_nothing(self) -> None:
        """Check after the run that the refused command created nothing under ``out``."""
        def check() -> None:
            assert not self.out.exists() or sorted(self.out.iterdir()) == [], sorted(self.out.rglob("*"))
        self.after.append(check)


def tree_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Case builders: each makes the user's files and returns the command line
# --------------------------------------------------------------------------------------------
def block_network(env: Env) -> None:
    """No network at all, as on an offline laptop: every connection and lookup fails."""
    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    env.monkeypatch.setattr(socket.socket, "connect", refuse)
    env.monkeypatch.setattr(socket, "getaddrinfo", refuse)
    env.monkeypatch.setattr(socket, "create_connection", refuse)


def download_offline(env: Env) -> list[str]:
    block_network(env)
    return ["download", "--model_type", "vit_t", "--output_dir", str(env.out / "weights")]


def download_present_but_corrupt(env: Env) -> list[str]:
    from samlora.models.checkpoints import CHECKPOINTS

    env.file(f"weights/{CHECKPOINTS['vit_t'].filename}", HTML)
    block_network(env)
    return ["download", "--model_type", "vit_t", "--output_dir", str(env.user / "weights")]


def train_args(env: Env, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--data_dir", str(data_dir), "--output_dir", str(env.out / "run"), *FAST_TRAIN,
            "--epochs", "1", *extra]


def images_without_masks(env: Env) -> Path:
    data = env.data()
    shutil.rmtree(data / "masks")
    return data


def corrupt_image(env: Env) -> Path:
    data = env.data()
    path = data / "images" / "b.png"
    path.write_bytes(path.read_bytes()[:200])  # truncated by an interrupted copy
    return data


def image_without_mask(env: Env) -> Path:
    data = env.data()
    (data / "masks" / "c.png").unlink()
    return data


def mask_of_another_size(env: Env) -> Path:
    data = env.data()
    mask = cv2.imread(str(data / "masks" / "a.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(data / "masks" / "a.png"), mask[:100])
    return data


def empty_masks(env: Env) -> Path:
    data = env.data()
    for mask in (data / "masks").iterdir():
        cv2.imwrite(str(mask), np.zeros((128, 128), np.uint8))
    return data


def stack_with_wrong_label_slices(env: Env) -> Path:
    """EPFL layout, but the label volume has one slice less than the image volume."""
    root = env.user / "stack"
    root.mkdir(parents=True)
    images = [cv2.imread(str(env.em4 / "images" / f"{n}.png"), cv2.IMREAD_GRAYSCALE) for n in "abc"]
    masks = [cv2.imread(str(env.em4 / "masks" / f"{n}.png"), cv2.IMREAD_GRAYSCALE) for n in "ab"]
    for name, planes in (("training.tif", images), ("training_groundtruth.tif", masks)):
        tifffile.imwrite(root / name, np.stack(planes), photometric="minisblack", compression="zlib")
    return root


def existing_output(env: Env) -> Path:
    """An output directory that already holds the user's own files."""
    path = env.file("results/notes.txt", b"my notes\n").parent
    return path


def existing_run(env: Env) -> Path:
    """An earlier training run's directory (its config.json and a checkpoint)."""
    env.file("run/config.json", json.dumps({"data_dir": "x", "output_dir": "run"}).encode())
    env.file("run/fold_0/best.pt", b"an earlier adapter")
    return env.user / "run"


def adapter_for_vit_b(env: Env) -> Path:
    from samlora.models import adapters

    path = env.user / "vit_b_adapter.pt"
    torch.save({"format": adapters.ADAPTER_FORMAT, "version": adapters.ADAPTER_VERSION,
                "config": {"model_type": "vit_b", "image_size": 256, "rank": 2, "alpha": 2, "targets": ["qkv"]},
                "state_dict": {}}, path)
    return path


def training_disk_full(target: str, nth: int) -> Callable[[Env], list[str]]:
    """Training whose ``nth`` write of ``target`` (last.pt or best.pt) finds the disk full.

    The write fails half-way through the temporary file (torch.save writes some bytes, then
    ENOSPC), as a real full disk does. Afterwards: the checkpoint of the previous epoch is
    intact, no temporary file is left, and ``--resume`` finishes the run.
    """
    def build(env: Env) -> list[str]:
        data = env.data()
        real_save = torch.save
        writes = {"n": 0}
        out = env.out / "run"

        def full_disk(obj, f, *args, **kwargs):
            keys = obj.keys() if isinstance(obj, dict) else ()
            is_target = ("trainable" in keys) if target == "last.pt" else ("format" in keys)
            if is_target:
                writes["n"] += 1
                if writes["n"] == nth:
                    f.write(b"PK\x03\x04 half a zip")
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        env.monkeypatch.setattr(torch, "save", full_disk)
        argv = train_args(env, data, "--epochs", str(nth + 1))

        def check() -> None:
            assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
            if nth > 1:  # the previous epoch's checkpoint survived, whole
                saved = torch.load(out / "fold_0" / target, weights_only=True)
                epoch = saved["state"]["epoch"] if target == "last.pt" else saved["config"]["epoch"]
                assert epoch == nth - 2
            env.monkeypatch.setattr(torch, "save", real_save)  # space freed: --resume finishes the run
            assert main_module.main([*argv, "--resume"]) == 0
            assert (out / "summary.json").is_file()

        env.after.append(check)
        return argv
    return build


def interrupted_training(env: Env) -> list[str]:
    """Ctrl-C in the second epoch: exit 130, the first epoch is kept, --resume continues."""
    data = env.data()
    original = trainer.train_one_epoch
    out = env.out / "run"

    def interrupt(ctx, loader, epoch, fold, limit=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(ctx, loader, epoch, fold, limit=limit)

    env.monkeypatch.setattr(trainer, "train_one_epoch", interrupt)

    def check() -> None:
        assert torch.load(out / "fold_0" / "last.pt", weights_only=True)["state"]["epoch"] == 0
        assert not (out / "summary.json").exists()

    env.after.append(check)
    return train_args(env, data, "--epochs", "2")


def missing_weights(command: str) -> Callable[[Env], list[str]]:
    """The default --checkpoint (weights/ in the current directory) was never downloaded."""
    def build(env: Env) -> list[str]:
        env.monkeypatch.chdir(env.user)
        if command == "demo":
            return ["demo", "--output_dir", str(env.out / "demo"), "--image_size", "256"]
        return ["train", "--data_dir", str(env.data()), "--output_dir", str(env.out / "run"),
                "--image_size", "256"]
    return build


def demo_args(env: Env, *extra: str) -> list[str]:
    return ["demo", "--output_dir", str(env.out / "demo"), *SMALL, "--num_samples", "1", *extra]


def evaluate_args(env: Env, data_dir: Path | None, *extra: str) -> list[str]:
    data = ["--data_dir", str(data_dir)] if data_dir is not None else []
    return ["evaluate", *data, "--output_dir", str(env.out / "eval"), *SMALL, *extra]


def predict_args(env: Env, *extra: str) -> list[str]:
    return ["detect", "predict", "--output_dir", str(env.out / "pred"), "--mode", "amg", *SMALL, *extra]


def detect_outputs_exist(env: Env) -> list[str]:
    image = env.data() / "images" / "a.png"
    env.file("pred/a_labels.tif", b"an earlier result")
    return ["detect", "predict", "--input", str(image), "--output_dir", str(env.user / "pred"), "--mode", "amg",
            *SMALL]


def lora_adapter(env: Env) -> str:
    """user/lora.pt: a LoRA adapter of the real vit_t at 256 px, with no instance decoder."""
    from samlora.models.adapters import save_adapter
    from samlora.models.lora import inject_lora, mark_only_lora_as_trainable
    from samlora.models.sam import build_model

    sam = build_model("vit_t", None, 256).sam
    inject_lora(sam, 2, 2, "qkv")
    mark_only_lora_as_trainable(sam)
    env.user.mkdir(parents=True, exist_ok=True)
    return str(save_adapter(env.user / "lora.pt", sam, {"model_type": "vit_t", "image_size": 256}))


def corrupt_tiff(env: Env) -> Path:
    return env.file("scans/volume.tif", b"II*\x00" + b"\x00" * 20)


def empty_dir(env: Env) -> Path:
    path = env.user / "empty"
    path.mkdir()
    return path


def one_image(env: Env) -> str:
    return str(env.data() / "images" / "a.png")


def search_args(env: Env, *extra: str) -> list[str]:
    return ["parameter_search", "--data_dir", str(env.data()), "--output_dir", str(env.out / "search"), *SMALL,
            *extra]


def study_of_another_search(recorded: dict) -> Callable[[Env], list[str]]:
    """The user's study database holds a study made for another search (its recorded identity:
    ``recorded``); the command must leave the database as it was."""
    def build(env: Env) -> list[str]:
        import optuna

        from samlora.training import studies

        url = f"sqlite:///{env.user / 'studies.db'}"
        optuna.create_study(storage=url, study_name="em").set_user_attr(studies.IDENTITY, recorded)
        return search_args(env, "--storage", url, "--study_name", "em")
    return build


def study_with_a_live_worker(env: Env) -> list[str]:
    """--overwrite of a study whose trial runs on a live worker (a fresh heartbeat), as when a
    job array's every task was started with --overwrite."""
    import optuna

    from samlora.training import studies

    url = f"sqlite:///{env.user / 'studies.db'}"
    storage = studies.open_storage(url, heartbeat=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeats are meant for Study.optimize": this worker is pretend
        trial = optuna.create_study(storage=storage, study_name="em").ask()
    storage.record_heartbeat(trial._trial_id)
    storage.engine.dispose()
    return search_args(env, "--storage", url, "--study_name", "em", "--overwrite")


def leaves_nothing(build: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    """``build``, and afterwards: nothing was created under ``out`` (not even a folder)."""
    def wrapped(env: Env) -> list[str]:
        env.leaves_nothing()
        return build(env)
    return wrapped


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def download_unreachable(env: Env) -> list[str]:
    """A mirror that refuses the connection: the line names the URL and where the file would go;
    no file (not even a partial one) is left."""
    url = f"http://127.0.0.1:{closed_port()}/mobile_sam.pt"
    weights = env.out / "weights"
    env.words += [url, str((weights / "mobile_sam.pt").absolute())]

    def no_file_left() -> None:
        assert [p for p in env.out.rglob("*") if p.is_file()] == []

    env.after.append(no_file_left)
    return ["download", "--model_type", "vit_t", "--output_dir", str(weights), "--url", url,
            "--sha256", "0" * 64, "--timeout", "5"]


def evaluate_run_with_test_split(env: Env) -> list[str]:
    """A training run (folds.json, config.json) scored with --split test."""
    data = env.data()
    env.file("run/folds.json", b"{}")
    env.file("run/config.json", json.dumps({"data_dir": str(data)}).encode())
    return evaluate_args(env, data, "--cv_run", str(env.user / "run"), "--split", "test")


def evaluate_output_in_data(env: Env) -> list[str]:
    data = env.data()

    def nothing_in_the_data() -> None:
        assert not (data / "results").exists()

    env.after.append(nothing_in_the_data)
    return [*evaluate_args(env, data), "--output_dir", str(data / "results")]


def not_yolo(env: Env) -> str:
    """A PyTorch file that is not a YOLO model."""
    path = env.user / "not_yolo.pt"
    torch.save({"image_encoder.weight": torch.zeros(2)}, path)
    return str(path)


def four_d_tiff(env: Env) -> str:
    path = env.user / "4d.tif"
    tifffile.imwrite(path, np.zeros((2, 2, 8, 8), np.uint8), photometric="minisblack")
    return str(path)


def detect_train_args(env: Env, *extra: str) -> list[str]:
    return ["detect", "train", "--data_dir", str(env.data()), "--output_dir", str(env.out / "yolo"),
            "--data_format", "folders", "--val_fraction", "0.25", "--epochs", "2", "--imgsz", "256",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--no_plots", "--seed", "0", *extra]


def em_stack(env: Env) -> Path:
    """A 3-section TIFF stack of the real EM crops (user/stack.tif)."""
    path = env.user / "stack.tif"
    images = [cv2.imread(str(env.em4 / "images" / f"{n}.png"), cv2.IMREAD_GRAYSCALE) for n in "abc"]
    tifffile.imwrite(path, np.stack(images), photometric="minisblack")
    return path


def zarr_of(env: Env, name: str, shape: tuple[int, ...], ome_axes: str | None = None) -> str:
    """A Zarr array of ``shape`` (or, with ``ome_axes``, an OME-Zarr image with those axes) in user/."""
    import zarr

    path = env.user / name
    if ome_axes is None:
        zarr.create_array(store=str(path), shape=shape, dtype="uint8")[:] = 1
        return str(path)
    group = zarr.open_group(str(path), mode="w")
    group.attrs["ome"] = {"multiscales": [{"axes": [{"name": a} for a in ome_axes], "datasets": [{"path": "0"}]}]}
    group.create_array("0", shape=shape, dtype="uint8")[:] = 1
    return str(path)


def seeds_of_another_shape(env: Env) -> list[str]:
    seeds = env.user / "seeds.tif"
    tifffile.imwrite(seeds, np.ones((3, 64, 64), np.uint16), photometric="minisblack")
    return predict_args(env, "--input", str(em_stack(env)), "--seed_labels", str(seeds))


def corrupt_seeds(env: Env) -> list[str]:
    """A seed label stack of the volume's shape whose second section's compressed data is garbage:
    its header reads, that section does not."""
    seeds = env.user / "seeds.tif"
    tifffile.imwrite(seeds, np.ones((3, 128, 128), np.uint16), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(seeds) as tif:
        start, size = tif.pages[1].dataoffsets[0], tif.pages[1].databytecounts[0]
    data = bytearray(seeds.read_bytes())
    data[start:start + size] = b"\xff" * size
    seeds.write_bytes(bytes(data))
    return predict_args(env, "--input", str(em_stack(env)), "--seed_labels", str(seeds))


def unwritable_output(env: Env) -> list[str]:
    """--output_dir inside a folder the user may not write to (the OS refuses every new entry there)."""
    locked = env.out / "locked"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path).absolute().is_relative_to(locked.absolute()):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    env.monkeypatch.setattr(os, "mkdir", refuse)
    return predict_args(env, "--input", str(em_stack(env)), "--output_dir", str(locked / "pred"))


def interrupted_run(env: Env, store_record: dict) -> Path:
    """user/pred: what an interrupted detect predict of user/stack.tif leaves (its manifest and
    section store, 2 sections done), the store made with ``store_record``."""
    env.file("pred/.samlora_outputs.json", json.dumps({"command": "detect predict",
                                                       "files": [".detect_predict_work/"]}).encode())
    env.file("pred/.detect_predict_work/stack.sections/store.json", json.dumps(store_record).encode())
    for z in range(2):
        env.file(f"pred/.detect_predict_work/stack.sections/{z:06d}.npz", b"a finished section")
    return env.user / "pred"


def resume_with_other_options(env: Env) -> list[str]:
    stack = em_stack(env)
    out = interrupted_run(env, {"version": 1, "input": str(stack.resolve()), "shape": [3, 128, 128], "model": "another"})
    return [*predict_args(env, "--input", str(stack), "--resume"), "--output_dir", str(out)]


def interrupted_without_resume(env: Env) -> list[str]:
    stack = em_stack(env)
    return [*predict_args(env, "--input", str(stack)), "--output_dir", str(interrupted_run(env, {}))]


def unreachable_scheduler(env: Env) -> list[str]:
    from samlora.inference import cluster

    env.monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    env.leaves_nothing()
    return predict_args(env, "--input", str(em_stack(env)), "--scheduler", "tcp://127.0.0.1:9")


# --------------------------------------------------------------------------------------------
# The table: (id, command line builder, words the one error line must contain (one string, or a
# tuple of them), exit code)
# --------------------------------------------------------------------------------------------
VIT_B_FOR_VIT_T = "is a vit_b checkpoint but --model_type is vit_t"
DOWNLOAD_COMMAND = "python main.py download --model_type vit_t"
YOLO_ARGS = ["--prompt", "yolo", "--conf", "0.00001", "--max_det", "6"]
CASES: list[tuple[str, Callable[[Env], list[str]], str | tuple[str, ...], int]] = [
    # download
    ("download offline", download_offline, "cannot download", 2),
    ("download present file corrupt", download_present_but_corrupt, "present file fails verification", 2),
    ("download --url with all",
     lambda e: ["download", "--model_type", "all", "--url", "http://127.0.0.1:9/x", "--output_dir", str(e.out)],
     "use them with a single --model_type", 2),
    ("download --sha256 not hex", lambda e: ["download", "--sha256", "xyz"], "expected 64 hex characters", 2),
    ("download --sha256 too short", lambda e: ["download", "--sha256", "abc", "--output_dir", str(e.out)],
     "expected 64 hex characters", 2),
    ("download server unreachable", download_unreachable, "cannot download", 2),
    # train: data
    ("train data dir missing", lambda e: train_args(e, e.user / "nowhere"), "is not a directory", 2),
    ("train data dir empty", lambda e: train_args(e, empty_dir(e)), "no images found", 2),
    ("train images without masks folder", lambda e: train_args(e, images_without_masks(e)), "masks", 2),
    ("train corrupt image", lambda e: train_args(e, corrupt_image(e)), "cannot read", 2),
    ("train image without mask", lambda e: train_args(e, image_without_mask(e)), "without a mask", 2),
    ("train mask of another size", lambda e: train_args(e, mask_of_another_size(e)), "size mismatch", 2),
    ("train stack with a label slice missing", lambda e: train_args(e, stack_with_wrong_label_slices(e)),
     "3 slices but its labels", 2),
    # train: numbers
    ("train negative epochs", lambda e: train_args(e, e.data(), "--epochs", "-1"),
     "--epochs must be at least 1", 2),
    ("train batch size 0", lambda e: train_args(e, e.data(), "--batch_size", "0"),
     "--batch_size must be at least 1", 2),
    ("train image size 300", lambda e: train_args(e, e.data(), "--image_size", "300"), "invalid choice: 300", 2),
    ("train more folds than groups", lambda e: train_args(e, e.data(), "--cross_validation", "--num_folds", "10"),
     "cannot make 10 folds from 4 groups", 2),
    ("train validation fraction 1.5", lambda e: train_args(e, e.data(), "--val_fraction", "1.5"),
     "--val_fraction must be between 0 and 1", 2),
    ("train rank 0 and nothing else", lambda e: train_args(e, e.data(), "--lora_rank", "0"), "nothing to train", 2),
    ("train decoder LoRA with the decoder trained", lambda e: train_args(e, e.data(), "--train_decoder"),
     "--lora_targets decoder with --train_decoder trains the decoder's weights twice", 2),
    ("train cross-validation with one fold",
     lambda e: train_args(e, e.data(), "--cross_validation", "--num_folds", "1"), "at least 2", 2),
    ("train unknown loss", lambda e: train_args(e, e.data(), "--loss", "hinge"), "unknown --loss", 2),
    ("train unknown loss resolution", lambda e: train_args(e, e.data(), "--loss_resolution", "full"),
     "invalid choice: 'full'", 2),
    ("train unknown prompt", lambda e: train_args(e, e.data(), "--prompt", "scribble"), "unknown --prompt", 2),
    ("train unknown LoRA target", lambda e: train_args(e, e.data(), "--lora_targets", "qkv,nope"),
     "unknown LoRA target", 2),
    ("train fp16 on the CPU", lambda e: train_args(e, e.data(), "--precision", "fp16"), "fp16 needs a CUDA GPU", 2),
    ("train LoRA blocks past the last", lambda e: train_args(e, e.data(), "--lora_blocks", "last11"),
     "--lora_blocks 'last11': lastN needs N in 1..10", 2),
    ("train LoRA blocks not numbers", lambda e: train_args(e, e.data(), "--lora_blocks", "late"), "not a block number", 2),
    ("train LoRA blocks with a frozen encoder", lambda e: train_args(e, e.data(), "--lora_blocks", "last2"),
     "no encoder layer trains", 2),
    ("train a GPU this machine lacks", lambda e: train_args(e, e.data(), "--device", "cuda:7"), "--device cuda:7", 2),
    # train: checkpoints
    ("train vit_b checkpoint for vit_t", lambda e: train_args(e, e.data(), "--checkpoint", str(e.vit_b)),
     VIT_B_FOR_VIT_T, 2),
    ("train checkpoint is an HTML page",
     lambda e: train_args(e, e.data(), "--checkpoint", str(e.file("mobile_sam.pt", HTML))),
     "is not a readable PyTorch checkpoint", 2),
    ("train checkpoint missing", lambda e: train_args(e, e.data(), "--checkpoint", str(e.user / "none.pth")),
     "does not exist", 2),
    ("train weights never downloaded", missing_weights("train"), DOWNLOAD_COMMAND, 2),
    # train: output directory
    ("train output dir holds other files",
     lambda e: [*train_args(e, e.data()), "--output_dir", str(existing_output(e))], "exists and is not empty", 2),
    ("train output dir holds a run", lambda e: [*train_args(e, e.data()), "--output_dir", str(existing_run(e))],
     "use --resume to continue it", 2),
    ("train --resume without a run", lambda e: train_args(e, e.data(), "--resume"), "no run to resume", 2),
    # train: during the run
    ("train disk full writing last.pt", training_disk_full("last.pt", 2), "no space left on device writing", 2),
    ("train disk full writing best.pt", training_disk_full("best.pt", 1), "no space left on device writing", 2),
    ("train interrupted", interrupted_training, "rerun the same command with --resume", 130),
    # parameter_search
    ("search ranks not numbers", lambda e: search_args(e, "--lora_ranks", "a,b"),
     "--lora_ranks must be a comma-separated list", 2),
    ("search bad LoRA blocks", lambda e: search_args(e, "--lora_blocks_grid", "all", "9-99"), "outside blocks 0-9", 2),
    ("search negative learning rate", lambda e: search_args(e, "--learning_rates", "1e-3,-1"),
     "--learning_rates needs positive values", 2),
    ("search more folds than groups", lambda e: search_args(e, "--num_folds", "9"),
     "cannot make 9 folds from 4 groups", 2),
    ("search output dir holds other files", lambda e: [*search_args(e), "--output_dir", str(existing_output(e))],
     "exists and is not empty", 2),
    ("search --n_trials with the grid", lambda e: search_args(e, "--n_trials", "4"),
     "--n_trials is for --sampler tpe", 2),
    ("search tpe without --n_trials", lambda e: search_args(e, "--sampler", "tpe"), "--sampler tpe needs --n_trials", 2),
    ("search tpe with a list of ranks",
     lambda e: search_args(e, "--sampler", "tpe", "--n_trials", "4", "--lora_ranks", "2,4,8"),
     "give a range LOW,HIGH", 2),
    ("search negative --prune_startup", lambda e: search_args(e, "--prune", "--prune_startup", "-1"),
     "--prune_startup must be >= 0", 2),
    ("search storage not a URL", lambda e: search_args(e, "--storage", "runs/study.db"), "is not a database URL", 2),
    ("search storage of an unknown kind", lambda e: search_args(e, "--storage", "nosuchdb://host/db"),
     "is not a database URL", 2),
    ("search storage folder missing",
     lambda e: search_args(e, "--storage", f"sqlite:///{e.user / 'nowhere' / 'study.db'}"),
     ("cannot open the study storage", "unable to open database file"), 2),
    ("search storage server unreachable",
     lambda e: search_args(e, "--storage", f"postgresql://samlora:secret@127.0.0.1:{closed_port()}/studies"),
     ("cannot open the study storage postgresql://samlora:***@127.0.0.1", "Connection refused"), 2),
    ("search study of another search space",
     study_of_another_search({"space": {"sampler": "grid", "lora_rank": [2], "lora_alpha": [2.0],
                                        "learning_rate": [0.001]}}),
     ("was made for another search", "space.lora_rank: [2] -> [2, 4, 8, 16]"), 2),
    ("search study of other data", study_of_another_search({"data": "0" * 64}),
     ("was made for another search", "data: '000"), 2),
    ("search --overwrite of a study with a live worker", study_with_a_live_worker,
     "are running on other workers", 2),
    # evaluate
    ("evaluate no data dir", lambda e: evaluate_args(e, None), "--data_dir is required", 2),
    ("evaluate data dir missing", lambda e: evaluate_args(e, e.user / "nowhere"), "does not exist", 2),
    ("evaluate masks all empty", lambda e: evaluate_args(e, empty_masks(e)), "no labelled object", 2),
    ("evaluate adapter is a SAM checkpoint", lambda e: evaluate_args(e, e.data(), "--model_path", str(e.vit_b)),
     "is not a LoRA adapter file", 2),
    ("evaluate adapter of another model type",
     lambda e: evaluate_args(e, e.data(), "--model_path", str(adapter_for_vit_b(e))),
     "is an adapter for model_type vit_b", 2),
    ("evaluate --compare without NAME=", lambda e: evaluate_args(e, e.data(), "--compare", "lora"),
     "write NAME=SOURCE", 2),
    ("evaluate --split test without one", lambda e: evaluate_args(e, e.data(), "--split", "test"),
     "has no fixed test split", 2),
    ("evaluate --split val without a run", lambda e: evaluate_args(e, e.data(), "--split", "val"),
     "needs a training run", 2),
    ("evaluate run with --split test", evaluate_run_with_test_split, "needs --split val", 2),
    ("evaluate unknown prompt", lambda e: evaluate_args(e, e.data(), "--prompt", "lasso"), "unknown mode", 2),
    ("evaluate output dir holds other files",
     lambda e: [*evaluate_args(e, e.data()), "--output_dir", str(existing_output(e))], ("is not empty", "--overwrite"),
     2),
    ("evaluate output dir inside the data", evaluate_output_in_data, "which is an input of this command", 2),
    ("evaluate vit_b checkpoint for vit_t", lambda e: [*evaluate_args(e, e.data()), "--checkpoint", str(e.vit_b)],
     VIT_B_FOR_VIT_T, 2),
    ("evaluate batch_prompts 0", lambda e: evaluate_args(e, e.data(), "--batch_prompts", "0"),
     "--batch_prompts must be at least 1", 2),
    ("evaluate yolo without a model", lambda e: evaluate_args(e, e.data(), *YOLO_ARGS), "needs --yolo_model", 2),
    ("evaluate yolo model missing",
     lambda e: evaluate_args(e, e.data(), *YOLO_ARGS, "--yolo_model", str(e.user / "none.pt")), "not found", 2),
    ("evaluate yolo model not a YOLO file",
     lambda e: evaluate_args(e, e.data(), *YOLO_ARGS, "--yolo_model", not_yolo(e)), "is not a YOLO model", 2),
    ("evaluate yolo conf 2",
     lambda e: evaluate_args(e, e.data(), *YOLO_ARGS, "--yolo_model", str(e.fixture("untrained_yolo")), "--conf", "2"),
     "--conf must be in 0..1", 2),
    # detect
    ("detect predict input missing", lambda e: predict_args(e, "--input", str(e.user / "nothing.png")),
     "does not exist", 2),
    ("detect predict empty folder", lambda e: predict_args(e, "--input", str(empty_dir(e))), "holds no images", 2),
    ("detect predict input is a text file", lambda e: predict_args(e, "--input", str(e.file("notes.txt", b"hello"))),
     "neither an image", 2),
    ("detect predict 4-D TIFF", lambda e: predict_args(e, "--input", four_d_tiff(e)), "only 2-D images and 3-D", 2),
    ("detect predict tile overlap as large as the tile",
     lambda e: predict_args(e, "--input", one_image(e), "--tile_size", "100", "--tile_overlap", "100"),
     "--tile_overlap", 2),
    ("detect predict corrupt stack", lambda e: predict_args(e, "--input", str(corrupt_tiff(e))), "cannot read", 2),
    ("detect predict yolo without model", lambda e: [*predict_args(e, "--input", one_image(e)), "--mode", "yolo"],
     "needs --yolo_model", 2),
    ("detect predict YOLO model missing",
     lambda e: [*predict_args(e, "--input", one_image(e)), "--mode", "yolo", "--yolo_model", str(e.user / "none.pt")],
     "YOLO model", 2),
    ("detect predict not a YOLO model",
     lambda e: [*predict_args(e, "--input", one_image(e)), "--mode", "yolo", "--yolo_model", not_yolo(e)],
     "is not a YOLO model", 2),
    ("detect predict adapter is an HTML page",
     lambda e: predict_args(e, "--input", one_image(e), "--model_path", str(e.file("adapter.pt", HTML))),
     "is not a LoRA adapter file", 2),
    ("detect predict vit_b checkpoint for vit_t",
     lambda e: [*predict_args(e, "--input", one_image(e)), "--checkpoint", str(e.vit_b)], VIT_B_FOR_VIT_T, 2),
    ("detect predict outputs exist", detect_outputs_exist, "exists and is not empty", 2),
    ("detect predict ais without a decoder", lambda e: [*predict_args(e, "--input", one_image(e)), "--mode", "ais"],
     ("--mode ais", "--instance_decoder", "decoder_state"), 2),
    ("detect predict apg with an adapter without decoder",
     lambda e: [*predict_args(e, "--input", one_image(e), "--model_path", lora_adapter(e)), "--mode", "apg"],
     ("--mode apg", "holds no instance decoder", "--instance_decoder"), 2),
    ("detect predict write_maps with amg", lambda e: predict_args(e, "--input", one_image(e), "--write_maps"),
     ("--write_maps", "--mode amg", "ais or apg"), 2),
    ("detect predict write_maps with yolo",
     lambda e: [*predict_args(e, "--input", one_image(e), "--write_maps"), "--mode", "yolo"],
     ("--write_maps", "--mode yolo"), 2),
    ("detect predict ais threshold above 1",
     lambda e: [*predict_args(e, "--input", one_image(e), "--center_distance_threshold", "1.5"), "--mode", "ais"],
     "--center_distance_threshold must be in [0, 1]", 2),
    ("detect predict Zarr without 3 spatial axes",
     lambda e: predict_args(e, "--input", zarr_of(e, "plane.zarr", (128, 128))), "needs 3 spatial axes", 2),
    ("detect predict Zarr with channels",
     lambda e: predict_args(e, "--input", zarr_of(e, "rgb.zarr", (2, 3, 128, 128))), "channels", 2),
    ("detect predict OME-Zarr with channels",
     lambda e: predict_args(e, "--input", zarr_of(e, "ome.zarr", (3, 4, 64, 64), "czyx")), "has 3 channels", 2),
    ("detect predict seed labels of another shape", seeds_of_another_shape, "but the volume is (3, 128, 128)", 2),
    ("detect predict corrupt seed labels", corrupt_seeds, ("cannot read", "seeds.tif", "corrupt"), 2),
    ("detect predict unwritable output", unwritable_output, ("cannot write", "Permission denied"), 2),
    ("detect predict scheduler unreachable", unreachable_scheduler, "cannot reach the dask scheduler", 2),
    ("detect predict --resume with other options", resume_with_other_options, "with other options", 2),
    ("detect predict interrupted run without --resume", interrupted_without_resume,
     ("holds an interrupted detect predict run", "--resume"), 2),
    ("detect predict --resume without a run", lambda e: predict_args(e, "--input", str(em_stack(e)), "--resume"),
     "holds no interrupted", 2),
    ("detect train zero epochs",
     lambda e: ["detect", "train", "--data_dir", str(e.data()), "--output_dir", str(e.out / "yolo"), "--epochs", "0"],
     "--epochs and --batch_size must be >= 1", 2),
    ("detect train yolo config not found", lambda e: detect_train_args(e, "--yolo_model", "no_such_model.yaml"),
     "not found", 2),
    ("detect train yolo model of another format", lambda e: detect_train_args(e, "--yolo_model", "model.onnx"),
     "neither a model config", 2),
    ("detect train yolo_args amp", lambda e: detect_train_args(e, "--yolo_args", "amp=True"),
     "set by detect itself", 2),
    ("detect train yolo_args without =", lambda e: detect_train_args(e, "--yolo_args", "mosaic"),
     "expects key=value", 2),
    ("detect train fold 3 of 1", lambda e: detect_train_args(e, "--fold", "3"), "does not exist", 2),
    # demo
    ("demo weights never downloaded", leaves_nothing(missing_weights("demo")), DOWNLOAD_COMMAND, 2),
    ("demo output dir holds files", lambda e: [*demo_args(e), "--output_dir", str(existing_output(e))],
     "exists and is not empty", 2),
    ("demo negative num_samples", lambda e: demo_args(e, "--num_samples", "-1"), "--num_samples must be 0", 2),
    ("demo samples dir missing", lambda e: demo_args(e, "--samples_dir", str(e.user / "nowhere")),
     "does not exist", 2),
    ("demo samples dir empty", lambda e: demo_args(e, "--samples_dir", str(empty_dir(e))), "no sample datasets", 2),
    ("demo adapter is a SAM checkpoint", lambda e: demo_args(e, "--model_path", str(e.vit_b)),
     "is not a LoRA adapter file", 2),
    ("demo vit_b checkpoint for vit_t", lambda e: [*demo_args(e), "--checkpoint", str(e.vit_b)], VIT_B_FOR_VIT_T, 2),
    ("demo image size 300", lambda e: demo_args(e, "--image_size", "300"), "invalid choice: 300", 2),
]


def error_lines(caplog: pytest.LogCaptureFixture, stderr: str) -> list[str]:
    """Logged errors, plus argparse's ``main.py ...: error: ...`` line (it prints, not logs)."""
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return lines + [line for line in stderr.splitlines() if ": error: " in line]


# Cases that train for an epoch or more (with a resume): the rest fail before any real work.
TRAINING = {"train disk full writing last.pt", "train disk full writing best.pt", "train interrupted"}


@pytest.mark.parametrize(("build", "message", "code"),
                         [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0] in TRAINING else [])
                          for c in CASES])
def test_bad_input(build: Callable[[Env], list[str]], message: str | tuple[str, ...], code: int, main, em4: Path,
                   tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    env = Env(tmp_path / "user", tmp_path / "out", em4, request, monkeypatch)
    env.user.mkdir()
    argv = build(env)
    if argv[0] == "evaluate":
        env.leaves_nothing()
    before = tree_hashes(env.user)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == code
    captured = capsys.readouterr()
    lines = error_lines(caplog, captured.err)
    assert len(lines) == 1, lines
    for words in ((message,) if isinstance(message, str) else message) + tuple(env.words):
        assert words in lines[0], (words, lines[0])
    assert "\n" not in lines[0].strip()
    for text in (caplog.text, captured.err, captured.out):
        assert "Traceback" not in text
    assert tree_hashes(env.user) == before, "the user's files changed"
    assert not list(env.out.rglob("summary.json")), "a refused run wrote a summary"
    for check in env.after:
        check()


def test_the_table_covers_every_subcommand() -> None:
    """At least 25 cases, and every subcommand is in the table."""
    assert len(CASES) >= 25
    commands = {c[0].split()[0] for c in CASES}
    assert commands >= {"download", "train", "search", "evaluate", "detect", "demo"}
