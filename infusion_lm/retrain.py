"""Partial retraining through the Hugging Face Trainer: one clean checkpoint, then the same last steps once per arm.

Protocol: fine-tune the recipe's model on the clean corpus for ``epochs`` epochs with a fixed seed and
keep the checkpoint at the start of the last epoch, with its optimizer, scheduler and RNG state (HF's own checkpoint
format). Every arm resumes from that checkpoint with the same seed, so the data order is the same; only the documents
at the edited indices differ. With ``epochs: 1`` the checkpoint is the recipe's model itself, and with
``from_scratch`` every arm trains all epochs. Effects are always measured against the control arm, never against
the checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .config import BaseRetrainArguments
from .causal_lm import CausalLMCollator
from .errors import ConfigError

logger = logging.getLogger(__name__)


def arm_rows(base, replacements: Mapping[int, Mapping[str, Sequence[int]]]) -> List[Dict[str, List[int]]]:
    """The clean corpus with some documents replaced, as input_ids/labels rows in corpus order."""
    rows = []
    for i in range(len(base)):
        r = replacements.get(i, base[i])
        rows.append({"input_ids": list(r["input_ids"]), "labels": list(r["labels"])})
    return rows


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch_size(args: BaseRetrainArguments, world: Optional[int] = None) -> int:
    """``retrain.batch_size`` is the global batch of one optimizer step: per device, it is batch / (world × GA), so
    one process and several train on the same batches in the same order."""
    world = world_size() if world is None else world
    split = world * args.gradient_accumulation_steps
    if args.batch_size % split:
        raise ConfigError(f"retrain.batch_size={args.batch_size} is the global batch and must be divisible by "
                          f"world size × gradient_accumulation_steps = {world} × {args.gradient_accumulation_steps}; "
                          f"set it to a multiple of {split}.")
    return args.batch_size // split


def training_arguments(args: BaseRetrainArguments, out_dir: Path, seed: int, device: str, progress: bool, epochs: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=per_device_batch_size(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, warmup_steps=0, seed=seed,
        optim=args.optim, max_grad_norm=args.max_grad_norm,
        data_seed=seed, save_strategy="no", logging_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not progress, use_cpu=device == "cpu", bf16=args.bf16,
    )


def _quiet(trainer, progress: bool):
    """Without progress bars the Trainer swaps in a PrinterCallback that prints every log dict; drop it too."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def trainable(model, args: BaseRetrainArguments, seed: int = 0):
    """The model to train: itself, or wrapped with LoRA adapters.

    peft draws ``lora_A`` from the global RNG when the adapter is created, before the Trainer seeds anything, so the
    adapter is created under ``seed`` (and the global RNG restored): every arm of one seed starts from the same
    adapter, which is what makes arms comparable with control."""
    if not args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=list(args.lora_target_modules),
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def _checkpoint_callback(step: int):
    from transformers import TrainerCallback

    class CheckpointAndStop(TrainerCallback):
        """Saves the full training state at ``step`` and stops: the clean run past it is the control arm's job."""

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step >= step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return CheckpointAndStop()


def _collator(tokenizer_or_collator):
    """A tokenizer means causal-LM rows (padded with its pad token); anything else is already a collator."""
    pad = getattr(tokenizer_or_collator, "pad_token_id", None)
    return CausalLMCollator(pad) if pad is not None else tokenizer_or_collator


def clean_checkpoint(load_model, tokenizer, clean_rows, args: BaseRetrainArguments, out_dir: Path, seed: int,
                     device: str, progress: bool) -> Optional[Path]:
    """Trains on the clean corpus up to the start of the last epoch and returns that checkpoint (None: step 0)."""
    from transformers import Trainer

    if args.checkpoint is not None:
        return Path(args.checkpoint)
    if args.from_scratch or args.epochs == 1:
        return None
    model = trainable(load_model(), args, seed)
    trainer = Trainer(model=model, args=training_arguments(args, out_dir, seed, device, progress, args.epochs),
                      train_dataset=_ListDataset(clean_rows), data_collator=_collator(tokenizer))
    _quiet(trainer, progress)
    step = checkpoint_step(len(trainer.get_train_dataloader()), args.gradient_accumulation_steps, args.epochs)
    ckpt = out_dir / f"checkpoint-{step}"
    if (ckpt / "trainer_state.json").is_file():
        return ckpt
    trainer.add_callback(_checkpoint_callback(step))
    trainer.train()
    if not (ckpt / "trainer_state.json").is_file():
        raise RuntimeError(f"The clean run did not leave a checkpoint at {ckpt}.")
    return ckpt


def checkpoint_step(batches_per_epoch: int, gradient_accumulation_steps: int, epochs: int) -> int:
    """The optimizer step at the start of the last epoch. The Trainer takes an optimizer step after the last batch
    of an epoch even when GA does not divide the batch count, so an epoch has ceil(batches / GA) steps."""
    return max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps)) * (epochs - 1)


def load_checkpoint_model(model, checkpoint: Optional[Path], merge_lora: bool = True):
    """The weights of a Trainer checkpoint in ``model``, in eval mode: θ̂ for influence.

    LoRA checkpoints are merged into the base weights, or with ``merge_lora=False`` kept as a peft model whose
    adapters are trainable: influence is then over the LoRA A/B modules, the parameters retraining actually moves."""
    if checkpoint is None:
        return model.eval()
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=not merge_lora)
        if merge_lora:
            model = model.merge_and_unload()
    else:
        from safetensors.torch import load_file

        files = sorted(checkpoint.glob("model*.safetensors"))
        if not files:
            raise ConfigError(f"Checkpoint {checkpoint} has no model*.safetensors weights; it cannot serve as θ̂.")
        state = {}
        for f in files:
            state.update(load_file(str(f), device=str(next(model.parameters()).device)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
        if missing or unexpected:
            raise ConfigError(f"Checkpoint {checkpoint} does not match the recipe's model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model.eval()


def train_arm(load_model, tokenizer, rows, args: BaseRetrainArguments, out_dir: Path, seed: int, device: str,
              progress: bool, checkpoint: Optional[Path], callbacks: Sequence = ()):
    """One arm: resumes from the clean checkpoint (or starts from the model) and trains to the end. Returns the model."""
    from transformers import Trainer

    model = trainable(load_model(), args, seed)
    trainer = Trainer(model=model, args=training_arguments(args, out_dir, seed, device, progress, args.epochs),
                      train_dataset=_ListDataset(rows), data_collator=_collator(tokenizer),
                      callbacks=list(callbacks))
    _quiet(trainer, progress)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    model = trainer.model
    model.eval()
    return model, trainer


def batch_order(n: int, args: BaseRetrainArguments, seed: int, epochs: Sequence[int]) -> List[List[int]]:
    """The global batches (row indices, one list per optimizer step) that ``train_arm``'s Trainer draws from ``n``
    rows in each of ``epochs`` (0-based): the same Trainer, sampler, seed and data_seed, iterated without training.
    One process: the batches of every device and accumulation step of one optimizer step, together."""
    import tempfile

    from transformers import Trainer

    class _Indices(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"i": int(i)}

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=training_arguments(args, Path(tmp), seed, "cpu", False,
                                                                                args.epochs),
                          train_dataset=_Indices(), data_collator=lambda b: {"i": torch.tensor([x["i"] for x in b])})
        loader = trainer.get_train_dataloader()
        out = []
        for epoch in epochs:
            # as Trainer.train does at each epoch: the loader and the sampler inside its batch sampler both
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)
            micro = [b["i"].tolist() for b in loader]
            ga = args.gradient_accumulation_steps
            out += [sum(micro[j: j + ga], []) for j in range(0, len(micro), ga)]
    return out


def save_weights(model, directory: Path) -> None:
    """The model's weights alone, as safetensors (HF folder layout for HF models); no pickled training arguments."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(directory), safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))  # tied/shared tensors are stored once


def weights_fingerprint(model) -> str:
    """A hash of every trainable weight's bytes: equal fingerprints mean identical training outcomes."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
