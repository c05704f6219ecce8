"""Command line: `llama-pkg` (or `python -m llama_pkg`) `predict [--weights DIR] -i name=value ...` and `serve`."""

import argparse
import json
import sys

from .params import BOUNDS, DESCRIPTIONS, FIELDS, InputError, Request


def parse_inputs(pairs):
    """`-i name=value` pairs -> input dict, numbers converted by the field's type (as `cog predict -i` does)."""
    inputs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InputError(pair, "an input is given as name=value")
        if name not in FIELDS:
            raise InputError(name, f"unknown input; known inputs are {', '.join(FIELDS)}")
        if name in inputs:
            raise InputError(name, "given more than once (-i takes each input once)")
        if name in BOUNDS:
            kind = BOUNDS[name][0]
            try:
                value = kind(value)
            except ValueError:
                raise InputError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        inputs[name] = value
    return inputs


def inputs_help():
    """The inputs, each with its type, default and range, for `predict --help` (the schema's own facts)."""
    lines = ["inputs (-i NAME=VALUE; numbers as numbers):"]
    for name in FIELDS:
        default = Request.__dataclass_fields__[name].default
        facts = [BOUNDS[name][0].__name__ if name in BOUNDS else "str"]
        if name in ("prompt", "messages"):
            facts.append("give prompt or messages")
        elif name == "system_prompt":
            facts.append("default: Meta's system prompt")
        elif default not in (None, ""):
            facts.append(f"default {default}")
        if name in BOUNDS:
            facts.append(f"{BOUNDS[name][1]}..{BOUNDS[name][2]}")
        lines.append(f"  {name} ({', '.join(facts)}): {DESCRIPTIONS[name]}")
    return "\n".join(lines)


def predict(args):
    from . import runtime
    from .params import validate

    metrics, engine = {}, None
    try:
        inputs = parse_inputs(args.input)
        validate(inputs)
        engine = runtime.setup(args.weights)
        for chunk in runtime.predict(engine, inputs, metrics.__setitem__):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (ValueError, RuntimeError) as e:  # bad inputs, settings or weights: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        if metrics.get("input_token_count") or metrics.get("output_token_count"):  # it failed while generating
            print(json.dumps(metrics), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the generation stops, and what it generated is metered as usual
        sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        print(json.dumps(metrics), file=sys.stderr)
        return 130
    finally:
        if engine is not None and hasattr(engine.backend, "close"):
            engine.backend.close()  # between two steps: exiting while it computes would abort the process
    print(json.dumps(metrics), file=sys.stderr)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="llama-pkg", description="Llama 2 chat, the Cog package's engine (also python -m llama_pkg).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="stream one answer to stdout; metrics as JSON on stderr's last line",
                       epilog=inputs_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model folder or URL (default: $COG_WEIGHTS, else weights/llama-2-7b-chat; the "
                                     "demo model only when named: weights/smollm2-135m-instruct)")
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="an input (below)")
    p.set_defaults(run=predict)
    s = sub.add_parser("serve", help="Cog's HTTP server on this predictor, with its OpenAPI schema")
    s.add_argument("--weights", help="model folder or URL (default: $COG_WEIGHTS, else weights/llama-2-7b-chat)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 inside a "
                                                      "container)")
    s.add_argument("--port", type=int, default=5000, help="port to listen on (default %(default)s)")
    s.add_argument("--predictor", default="predict.py:Predictor", help="FILE:CLASS, a subclass of predict.Predictor")
    s.add_argument("--openai-port", type=int, help="also serve the OpenAI-compatible front (`openai`) on this port")
    s.add_argument("--model-name", help="the model name the OpenAI front serves (default: the weights folder's name)")
    s.add_argument("--on-setup-failure", choices=("exit", "stay"), default="exit",
                   help="exit: exit 1 with the setup's error (default); stay: keep serving, the health check saying "
                        "SETUP_FAILED with the reason (Cog's contract, for a container a platform watches)")
    s.set_defaults(run=lambda a: __import__("llama_pkg.serve", fromlist=["serve"]).serve(
        a.weights, a.host, a.port, a.predictor, a.openai_port, a.model_name, a.on_setup_failure))
    o = sub.add_parser("openai", help="an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) "
                                      "in front of a running Cog server of this package")
    o.add_argument("--upstream", default="http://127.0.0.1:5000", help="the Cog server's URL (default %(default)s)")
    o.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    o.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    o.add_argument("--model-name", default="llama-2-7b-chat", help="the model name clients send and /v1/models lists "
                                                                   "(default %(default)s)")
    o.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # exit when this process does (serve --openai-port)
    o.set_defaults(run=lambda a: __import__("llama_pkg.openai_front", fromlist=["serve"]).serve(
        a.upstream, a.host, a.port, a.model_name, a.parent))
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
