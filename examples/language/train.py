"""Train a DEQ-Transformer language model (character-level Shakespeare by default).

    python examples/language/train.py                      # ~5 minutes on 2 CPU cores
    python examples/language/train.py --dataset tiny --steps 20 --d-model 32
    python examples/language/train.py --dataset wikitext103 --data-dir ~/wikitext-103
    python examples/language/train.py --pretrain-steps 100 --jacobian-weight 0.5 \
        --jacobian-increment 0.1 --jacobian-every 100 --jacobian-frequency 0.35
    python examples/language/train.py --dataset tiny_shakespeare   # via tensorflow-datasets
    python examples/language/train.py --sampler top_k             # keras-hub's sampler
    python examples/language/train.py --help

The model is `keras_deq.models.DEQTransformerLM`: embeddings plus sinusoidal
positions injected into one `DEQ(DEQTransformerCell)`, a final LayerNorm and an
output projection tied to the embeddings. The script prints the validation bits
per character (character corpora) or perplexity (WikiText-103), the forward and
backward solver steps, and a sample continuation of a prompt: from the model's own
`generate` (temperature sampling) by default, or from one of keras-hub's samplers
(`--sampler greedy|random|top_k|top_p`, when keras-hub is installed: hub_sampling.py).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import backend_flag  # noqa: E402

backend_flag.apply()  # `--backend NAME`, before Keras loads

import keras  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import hub_sampling  # noqa: E402
import text_data as data  # noqa: E402

import keras_deq  # noqa: E402
from keras_deq.models import BitsPerCharacter, DEQTransformerLM, Perplexity  # noqa: E402


def build_model(vocab_size, args):
    """A compiled `DEQTransformerLM` from the command-line arguments."""
    model = DEQTransformerLM(
        vocab_size,
        d_model=args.d_model,
        num_heads=args.heads,
        ff_dim=args.ff_dim,
        norm=args.norm,
        dropout=args.dropout,
        solver=args.solver,
        max_iter=args.max_iter,
        tol=args.tol,
        backward=args.backward,
        jacobian_weight=args.jacobian_weight,
        jacobian_frequency=args.jacobian_frequency,
    )
    metric = BitsPerCharacter() if args.unit == "char" else Perplexity()
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[metric],
    )
    return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    backend_flag.add_to(parser)
    parser.add_argument("--dataset", choices=data.DATASETS, default="shakespeare")
    parser.add_argument("--data-dir", default=None, help="local WikiText-103 directory")
    parser.add_argument(
        "--limit", type=int, default=None, help="characters / lines of training text"
    )
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--valid-batches", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff-dim", type=int, default=None)
    parser.add_argument("--norm", choices=("pre", "post"), default="pre")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--solver", default="anderson")
    parser.add_argument("--backward", default="implicit")
    parser.add_argument("--max-iter", type=int, default=12)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--jacobian-weight", type=float, default=0.0)
    parser.add_argument("--jacobian-frequency", type=float, default=1.0)
    parser.add_argument(
        "--jacobian-increment", type=float, default=0.0, help="added every --jacobian-every steps"
    )
    parser.add_argument("--jacobian-every", type=int, default=None)
    parser.add_argument(
        "--pretrain-steps", type=int, default=0, help="explicit steps before the solver"
    )
    parser.add_argument("--pretrain-depth", type=int, default=2, help="cell steps when explicit")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--sample-length", type=int, default=200)
    parser.add_argument(
        "--sampler",
        choices=("model", *hub_sampling.SAMPLERS),
        default="model",
        help="model: DEQTransformerLM.generate; the others: keras-hub's samplers",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="path of a .keras file to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.sampler != "model":
        hub_sampling.import_keras_hub()  # before training: fails early without keras-hub
    keras.utils.set_random_seed(args.seed)
    corpus = data.load(args.dataset, args.seq_len, limit=args.limit, data_dir=args.data_dir)
    args.unit = corpus.unit
    print(
        f"{args.dataset}: {len(corpus.vocab)} {corpus.unit}s, "
        f"{len(corpus.train_x)} train / {len(corpus.valid_x)} valid windows of {args.seq_len}"
    )
    model = build_model(len(corpus.vocab), args)
    n_valid = min(len(corpus.valid_x), args.valid_batches * args.batch_size)
    valid = (corpus.valid_x[:n_valid], corpus.valid_y[:n_valid])
    callbacks = []
    pretrain = None
    if args.pretrain_steps > 0:
        pretrain = keras_deq.callbacks.ExplicitPretraining(
            args.pretrain_steps, args.pretrain_depth, verbose=1
        )
        callbacks.append(pretrain)
    if args.jacobian_weight > 0:
        schedule = keras_deq.callbacks.stepwise_schedule(
            args.jacobian_weight, increment=args.jacobian_increment, every=args.jacobian_every
        )
        # As in the recipes, the schedule counts the steps after pretraining.
        callbacks.append(
            keras_deq.callbacks.JacobianRegularizationScheduler(
                schedule, frequency=args.jacobian_frequency, after=pretrain
            )
        )
    start = time.time()
    history = model.fit(
        corpus.train_x,
        corpus.train_y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=min(args.steps, len(corpus.train_x) // args.batch_size) or 1,
        validation_data=valid,
        callbacks=callbacks,
        verbose=2,
    )
    elapsed = time.time() - start
    logs = {k: v[-1] for k, v in history.history.items()}
    name = "bpc" if corpus.unit == "char" else "perplexity"
    if "deq_fwd_steps" in logs:
        steps = (
            f"forward steps {logs['deq_fwd_steps']:.1f} (valid {logs['val_deq_fwd_steps']:.1f}), "
            f"backward steps {logs['deq_bwd_steps']:.1f}"
        )
    else:  # JAX: `fit`'s logs hold no solver metrics; the layer keeps the last call's
        steps = f"forward steps {model.deq.solver_statistics()['fwd_steps']:.0f} (last batch)"
    print(
        f"\nvalidation {name}: {logs[f'val_{name}']:.3f} (train {logs[name]:.3f}); "
        f"{steps}; {elapsed:.0f} s"
    )
    prompt = args.prompt
    if prompt is None:
        prompt = corpus.vocab.decode(corpus.valid_x[0][: min(16, args.seq_len)])
    tokens = corpus.vocab.encode(list(prompt) if corpus.unit == "char" else prompt.split())
    if args.sampler == "model":
        ids = model.generate(
            tokens,
            length=args.sample_length,
            temperature=args.temperature,
            seed=args.seed,
            max_context=args.seq_len,
        )
        via = ""
    else:
        sampler = hub_sampling.make_sampler(args.sampler, args.temperature, seed=args.seed)
        ids = hub_sampling.generate(
            model, tokens, args.sample_length, sampler, max_context=args.seq_len
        )
        via = f"keras-hub {args.sampler}, "
    print(f"\nsample ({via}seed {args.seed}):\n{corpus.vocab.decode(ids)}")
    if args.save:
        model.save(args.save)
        print(f"saved {args.save}")
    return model, history


if __name__ == "__main__":
    main()
