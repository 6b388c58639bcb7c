"""Recipe of the embedded decoder SMoE ``tiny-qwen3moe-64``: a stock ``Qwen3MoeForCausalLM`` (64 experts, top-8,
``norm_topk_prob``) pretrained on six text domains, then instruction-tuned so the tasks are solved by prompting.

Stages (each seeded; the build pins the torch thread count so the bytes do not depend on the caller's OMP
settings):
1. byte-level BPE tokenizer (:mod:`uncurl_hf.zoo.tokenizer`) on the train side of every domain;
2. causal-LM pretraining on 128-token chunks with a *fixed number of rows per domain in every batch*, with the
   router load-balancing loss on, *per layer*: the balance is computed over a batch that holds every domain, so
   experts are free to specialize per domain as long as the batch as a whole is spread over all 64 in every
   layer (transformers' loss balances the union of all layers' choices, which lets a layer's experts die while
   another layer over-uses them);
3. instruction stage on the prompts of :mod:`uncurl_hf.zoo.prompts` (task train splits, and IMDb review chunks
   as extra sentiment rows), loss on the label continuation only, with pretraining chunks replayed in every
   batch so the held-out perplexity survives. Batches hold one task each (similar lengths, little padding).
Both training stages save a resumable state (model + optimizer + step) every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Qwen3MoeConfig, Qwen3MoeForCausalLM

from uncurl_hf.zoo import domains, sources
from uncurl_hf.evaluation.prompts import continuation_ids, prompt_ids
from uncurl_hf.zoo.recipe import _save_training_state, lr_at, seed_everything
from uncurl_hf.zoo.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

TASKS = ("sentiment", "topic", "hedge")


@dataclass(frozen=True)
class DecoderModelSpec:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 64
    top_k: int = 8
    moe_intermediate_size: int = 32
    router_aux_loss_coef: float = 0.01
    max_position_embeddings: int = 512
    embedding_init: str = "ppmi-svd"  # or "random"
    embedding_rms: float = 0.05  # PPMI-SVD rows rescaled to this RMS (Qwen's init draws std 0.02)

    def config(self) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size,  # dense MLP width; unused (every layer is sparse)
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=self.router_aux_loss_coef,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )


@dataclass(frozen=True)
class DecoderPretrainSpec:
    steps: int = 1000
    chunk_tokens: int = 128
    # rows per batch for each domain (the batch size is their sum)
    rows: tuple[tuple[str, int], ...] = (
        ("reviews", 6), ("news", 6), ("hedge", 3), ("shakespeare", 5), ("wiki", 6), ("code", 6),
    )
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100
    balance: str = "per_layer"  # or "union" (transformers' own load_balancing_loss_func over all layers at once)

    def __post_init__(self) -> None:
        if self.balance not in ("per_layer", "union"):
            raise ValueError(f"balance must be 'per_layer' or 'union', not {self.balance!r}")


@dataclass(frozen=True)
class InstructSpec:
    epochs: int = 6
    batch_size: int = 32
    imdb_chunks_per_epoch: int = 1200  # extra sentiment rows: 112-token chunks of the train-side IMDb reviews
    replay_rows: int = 4  # pretraining chunks (LM loss) in every batch
    lr: float = 1e-3
    warmup: int = 30
    seed: int = 0
    checkpoint_every: int = 100


@dataclass(frozen=True)
class DecoderRecipe:
    name: str
    model: DecoderModelSpec = field(default_factory=DecoderModelSpec)
    pretrain: DecoderPretrainSpec = field(default_factory=DecoderPretrainSpec)
    instruct: InstructSpec = field(default_factory=InstructSpec)
    num_threads: int = 2
    experts_implementation: str = "grouped_mm"  # training only; the saved config keeps transformers' default

    @property
    def work_name(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ data


def tokenizer_corpus() -> list[str]:
    """Train-side documents of every domain (first 1M characters each, in the seeded order) + the sentiment
    task's train sentences (the only task text not already in a domain)."""
    out = []
    for domain in domains.DOMAINS:
        chars = 0
        for doc in domains.domain_splits(domain)["train"]:
            if chars >= 1_000_000:
                break
            out.append(doc)
            chars += len(doc)
    out.extend(text for text, _ in sources.sentiment_splits()["train"])
    return out


def domain_chunks(tokenizer: PreTrainedTokenizerBase, domain: str, split: str, chunk_tokens: int) -> np.ndarray:
    """The domain's ``split`` documents as one token stream (``</s>`` before each document), cut into chunks."""
    stream: list[int] = []
    for doc in domains.domain_splits(domain)[split]:
        stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
    usable = len(stream) // chunk_tokens * chunk_tokens
    return np.asarray(stream[:usable], dtype=np.int64).reshape(-1, chunk_tokens)


def pretrain_batch(chunks: dict[str, np.ndarray], spec: DecoderPretrainSpec, step: int) -> torch.Tensor:
    """Batch ``step``: for each domain its fixed number of rows, walking a per-domain seeded permutation
    (a new one each epoch of that domain). Depends only on (seed, step)."""
    rows = []
    for d, (domain, n) in enumerate(spec.rows):
        data = chunks[domain]
        per_epoch = len(data) // n
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([spec.seed, d, epoch]).permutation(len(data))
        rows.append(data[order[offset * n : (offset + 1) * n]])
    return torch.from_numpy(np.concatenate(rows))


def instruction_rows(tokenizer: PreTrainedTokenizerBase) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Per pool, ``(prompt ids, continuation ids)``: task train splits (minus held-out domain text) and the
    IMDb chunks (pool ``imdb``, scored as sentiment)."""
    held_news, held_hedge = domains.heldout_news_keys(), domains.heldout_hedge_texts()
    data = {
        "sentiment": sources.sentiment_splits()["train"],
        "topic": [r for r in sources.topic_splits()["train"] if r[0] not in held_news],
        "hedge": [r for r in sources.hedge_splits()["train"] if r[0] not in held_hedge],
    }
    out = {}
    for task, rows in data.items():
        conts = continuation_ids(tokenizer, task)
        out[task] = [(prompt_ids(tokenizer, task, text), conts[label]) for text, label in rows]
    train_reviews = set(domains.domain_splits("reviews")["train"])
    conts = continuation_ids(tokenizer, "sentiment")
    imdb = []
    for text, label in sources.pang_lee_reviews_labeled():
        if text not in train_reviews:
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for start in range(0, len(ids) - 16, 112):
            chunk = tokenizer.decode(ids[start : start + 112])
            imdb.append((prompt_ids(tokenizer, "sentiment", chunk), conts[label]))
    out["imdb"] = imdb
    return out


def instruction_schedule(pools: dict[str, list], spec: InstructSpec) -> list[tuple[str, list[int]]]:
    """``(pool, row indices)`` per step: every epoch, each pool's rows in a seeded order cut into batches (the
    IMDb pool capped per epoch); the batches of all pools then shuffled together."""
    schedule = []
    for epoch in range(spec.epochs):
        batches = []
        for p, pool in enumerate(sorted(pools)):
            order = np.random.default_rng([spec.seed, epoch, p]).permutation(len(pools[pool])).tolist()
            if pool == "imdb":
                order = order[: spec.imdb_chunks_per_epoch]
            batches.extend((pool, order[i : i + spec.batch_size]) for i in range(0, len(order), spec.batch_size))
        mix = np.random.default_rng([spec.seed, epoch, 999]).permutation(len(batches))
        schedule.extend(batches[i] for i in mix)
    return schedule


def _collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for k, (p, c) in enumerate(pairs):
        seq = p + c
        ids[k, : len(seq)] = torch.tensor(seq)
        mask[k, : len(seq)] = 1
        labels[k, len(p) : len(seq)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ training


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _load(recipe: DecoderRecipe, folder: Path) -> Qwen3MoeForCausalLM:
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.set_experts_implementation(recipe.experts_implementation)
    return model


def balance_loss(
    router_logits: tuple[torch.Tensor, ...], spec: DecoderModelSpec, per_layer: bool, attention_mask=None
) -> torch.Tensor:
    """The router load-balancing loss (Switch/Mixtral form, transformers' ``load_balancing_loss_func``):
    over the union of all layers' choices, or averaged over layers so that *every* layer spreads its tokens."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    if not per_layer:
        return load_balancing_loss_func(router_logits, spec.num_experts, spec.top_k, attention_mask)
    per = [load_balancing_loss_func((g,), spec.num_experts, spec.top_k, attention_mask) for g in router_logits]
    return torch.stack(per).mean()


def with_balance(out, recipe: "DecoderRecipe", attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's loss with the model's own balance term (union of layers) replaced by the recipe's;
    returns (total loss, balance loss)."""
    coef = recipe.model.router_aux_loss_coef
    balance = balance_loss(out.router_logits, recipe.model, recipe.pretrain.balance == "per_layer", attention_mask)
    return out.loss - coef * out.aux_loss + coef * balance, balance


def _step(model, optimizer, loss: torch.Tensor, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _log(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def build_tokenizer(recipe: DecoderRecipe, workdir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(tokenizer_corpus(), recipe.model.vocab_size).save_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(tok_dir)


def pretrain(recipe: DecoderRecipe, workdir: Path, progress: bool = True) -> Path:
    """Stage 2; resumes from ``workdir/pretrain-ckpt``. Returns the pretrained model folder."""
    spec = recipe.pretrain
    torch.set_num_threads(recipe.num_threads)
    tokenizer = build_tokenizer(recipe, workdir)
    out = workdir / "pretrained"
    if (out / "config.json").exists():
        return out
    seed_everything(spec.seed)
    ckpt, start = workdir / "pretrain-ckpt", 0
    if (ckpt / "trainer_state.pt").exists():
        model = _load(recipe, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer = _optimizer(model, spec.lr, spec.weight_decay)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        logger.info("resuming pretraining at step %d", start)
    else:
        model = Qwen3MoeForCausalLM(recipe.model.config())
        model.set_experts_implementation(recipe.experts_implementation)
        if recipe.model.embedding_init == "ppmi-svd":
            from uncurl_hf.zoo.embeddings import ppmi_svd_embeddings

            vectors = ppmi_svd_embeddings(tokenizer, tokenizer_corpus(), recipe.model.hidden_size, seed=spec.seed)
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(torch.from_numpy(vectors) * recipe.model.embedding_rms)
        optimizer = _optimizer(model, spec.lr, spec.weight_decay)
    chunks = {d: domain_chunks(tokenizer, d, "train", spec.chunk_tokens) for d, _ in spec.rows}
    model.train()
    log = workdir / "pretrain_log.jsonl"
    t0 = time.time()
    for step in tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc="pretrain", disable=not progress):
        ids = pretrain_batch(chunks, spec, step)
        loss, balance = with_balance(model(input_ids=ids, labels=ids, output_router_logits=True), recipe)
        _step(model, optimizer, loss, lr_at(step, spec.steps, spec.warmup, spec.lr))
        if step % 25 == 0 or step == spec.steps - 1:
            _log(log, {"step": step, "loss": round(float(loss.detach()), 4),
                       "aux": round(float(balance.detach()), 4), "elapsed_s": round(time.time() - t0, 1)})
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            _save_training_state(ckpt, model, optimizer, step + 1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def instruct(recipe: DecoderRecipe, pretrained: Path, workdir: Path, progress: bool = True) -> Path:
    """Stage 3; resumes from ``workdir/instruct-ckpt``. Returns the final model folder."""
    from transformers import AutoTokenizer

    spec, coef = recipe.instruct, recipe.model.router_aux_loss_coef
    torch.set_num_threads(recipe.num_threads)
    out = workdir / "instructed"
    if (out / "config.json").exists():
        return out
    seed_everything(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    pools = instruction_rows(tokenizer)
    schedule = instruction_schedule(pools, spec)
    chunks = {d: domain_chunks(tokenizer, d, "train", recipe.pretrain.chunk_tokens) for d, _ in recipe.pretrain.rows}
    replay = np.concatenate([chunks[d] for d, _ in recipe.pretrain.rows])
    ckpt, start = workdir / "instruct-ckpt", 0
    if (ckpt / "trainer_state.pt").exists():
        model = _load(recipe, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        start = int(state["step"])
    else:
        model = _load(recipe, pretrained)
        state = None
    optimizer = _optimizer(model, spec.lr, recipe.pretrain.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.train()
    log = workdir / "instruct_log.jsonl"
    total = len(schedule)
    t0 = time.time()
    for step in tqdm(range(start, total), initial=start, total=total, desc="instruct", disable=not progress):
        pool, idx = schedule[step]
        batch = _collate([pools[pool][i] for i in idx], tokenizer.pad_token_id)
        out_ = model(**batch, output_router_logits=True)  # loss: the continuation tokens only (+ aux)
        loss = with_balance(out_, recipe, batch["attention_mask"])[0]
        if spec.replay_rows:
            rng = np.random.default_rng([spec.seed, 7, step])
            ids = torch.from_numpy(replay[rng.choice(len(replay), size=spec.replay_rows, replace=False)])
            loss = loss + with_balance(model(input_ids=ids, labels=ids, output_router_logits=True), recipe)[0]
        _step(model, optimizer, loss, lr_at(step, total, spec.warmup, spec.lr))
        if step % 25 == 0 or step == total - 1:
            _log(log, {"step": step, "pool": pool, "loss": round(float(out_.loss.detach()) - coef * float(out_.aux_loss), 4),
                       "elapsed_s": round(time.time() - t0, 1)})
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < total:
            _save_training_state(ckpt, model, optimizer, step + 1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
