"""
One config system for every script, in nanoGPT's shape: each script opens with a block of commented defaults

    # ----------------------------------------------------------------------------- config
    batch_size = 32      # micro-batch sequences per process [>=1]
    dtype = "auto"       # "auto" = bf16 autocast on cuda, float32 elsewhere {auto|float32|bfloat16}
    # -----------------------------------------------------------------------------

then config files of plain assignments and --key=value arguments are applied in the order given:

    python train.py configs/crnet_llama_60m.py --max_iters=2000 --torch_compile

A trailing [..] or {..} in a comment is the key's rule, checked before any work starts: [>=1], [>0], [>=0], an
interval such as [0,1) or (0,1], or a choice {a|b|c}. A bare --flag sets a boolean key to True. Unknown keys,
wrong types, values outside their rule and config-file lines that are not plain `key = value` assignments are
errors naming the key or the file and line; a config file written for another script says which script.
--help prints every key with its default and its comment.
"""
import ast
import difflib
import functools
import math
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # the repository root: scripts are named relative to it ("tools/bench.py")
BEGIN, END = "# " + "-" * 77 + " config", "# " + "-" * 77
SAFE = {"__builtins__": {}, "int": int, "float": float, "str": str, "bool": bool, "list": list}  # eval's names: defaults, files
FILE_FUNCS = {"min": min, "max": max, "round": round, "range": range}  # what a config file's arithmetic may call
NUM = r"-?(?:\d+(?:\.\d*)?(?:e[+-]?\d+)?|inf)"
RENAMED = {"compile": "torch_compile", "parallel": "data_parallel"}  # keys renamed: the builtin and module they shadowed
RULE = re.compile(rf"\s*(\[[<>]=?\s*{NUM}\]|[\[(]{NUM},\s*{NUM}[\])]|\{{[\w.:/-]+(?:\|[\w.:/-]+)+\}})\s*$")


class ConfigError(ValueError):
    """A bad value of one key: printed as `error: key=value: why`."""

    def __init__(self, key, value, why):
        super().__init__(f"{key}={value!r}: {why}")
        self.key = key

    def with_message(self, text):
        self.args = (text,)
        return self


class Key:
    def __init__(self, name, default, comment, types=None):
        self.name, self.default, self.comment = name, default, comment
        m = RULE.search(comment)
        self.rule = m.group(1) if m else None
        self.types = types or (type(default),)

    def coerce(self, value):
        """value of this key's type: ints are accepted for floats, integral floats (1e4) for ints."""
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) and int in self.types:  # rank=[8, 1e1], as rank=1e1 alone
            value = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if int in self.types and isinstance(value, float) and value.is_integer() and float not in self.types:
            return int(value)
        if isinstance(value, bool) != (bool in self.types) or not isinstance(value, self.types):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in self.types)
            raise ConfigError(self.name, value, f"expected {names}")
        return value

    def choices(self):
        """The values a `{a|b}` rule allows, or None."""
        return [x.strip() for x in self.rule[1:-1].split("|")] if self.rule and self.rule.startswith("{") else None

    def check(self, value):
        """Raise ConfigError if value breaks this key's rule."""
        r = self.rule
        if r is None or value is None:
            return
        if r.startswith("{"):
            choices = self.choices()
            if str(value) not in choices:
                raise ConfigError(self.name, value, f"must be one of {', '.join(choices)}")
            return
        nums = value if isinstance(value, list) else [value]
        for v in nums:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(self.name, value, f"must be a finite number {r}")
        body = r[1:-1].replace(" ", "")
        if body.startswith((">", "<")):
            op, bound = re.match(r"([<>]=?)(.*)", body).groups()
            ok = {">": lambda v: v > float(bound), ">=": lambda v: v >= float(bound),
                  "<": lambda v: v < float(bound), "<=": lambda v: v <= float(bound)}[op]
            why = f"must be {op} {bound}"
        else:
            lo, hi = (float(x) for x in body.split(","))
            ok = lambda v: (lo <= v if r[0] == "[" else lo < v) and (v <= hi if r[-1] == "]" else v < hi)
            why = f"must be in {r}"
        for v in nums:
            if not ok(v):
                raise ConfigError(self.name, value, why)


def check_folder(key, value):
    """A directory that key names, checked before any work: neither it nor a directory above it may be a file (a
    write there would fail only at the end, with an errno message that names no key), nor may it be empty ("" is
    the current directory: a run there would write, and with overwrite remove, its files)."""
    if not value.strip():
        raise ConfigError(key, value, "is empty: name a directory (. for the current one)")
    path = Path(value).absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if not there.is_dir():
        raise ConfigError(key, value, ("is a file" if there == path else f"{there} is a file") + ", not a directory")


def fsync(path):
    """Force a file's data (a directory: its entries) to disk. A rename publishes a file as complete, so without it a
    power or machine loss soon after could leave it empty (ckpt.pt, meta.json): a killed process cannot.
    A file's write error that only fsync reports (EIO, a full disk) is raised, before the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
        # (some file systems cannot sync a directory)
    finally:
        os.close(fd)


def config_block(path):
    """The statements between the config markers of a script (its defaults), as (node, source) pairs."""
    text = Path(path).read_text()
    lines = text.splitlines()
    try:
        start = lines.index(BEGIN) + 1
        stop = lines.index(END, start)
    except ValueError:
        raise RuntimeError(f"{path} has no config block ({BEGIN!r} ... {END!r})") from None
    tree = ast.parse("\n".join(lines[start:stop]))
    return tree.body, lines[start:stop]


@functools.lru_cache(maxsize=None)
def spec(script):
    """{name: Key} of a script's config block: defaults evaluated in order, comments from the same line.
    A TYPES = {...} assignment in the block names keys whose allowed types are not their default's."""
    body, lines = config_block(HERE / script)
    ns, keys, types = {}, {}, {}
    for node in body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise RuntimeError(f"{script}: the config block holds only `key = value` lines (line {node.lineno})")
        name = node.targets[0].id
        value = eval(compile(ast.Expression(node.value), script, "eval"), SAFE, ns)
        ns[name] = value
        if name == "TYPES":
            types = {k: tuple(type(None) if t is None else t for t in v) for k, v in value.items()}
            continue
        _, _, comment = lines[node.lineno - 1].partition("#")
        keys[name] = Key(name, value, comment.strip())
    for k, t in types.items():
        keys[k].types = t
    return keys


def defaults(*scripts):
    """{key: default} of the scripts' config blocks, later scripts' keys last."""
    return {k: v.default for s in scripts for k, v in spec(s).items()}


@functools.lru_cache(maxsize=None)
def scripts():
    """Every script with a config block: the top level's, then tools/'s."""
    paths = [*sorted(HERE.glob("*.py")), *sorted(HERE.glob("tools/*.py"))]
    return tuple(p.relative_to(HERE).as_posix() for p in paths if BEGIN in p.read_text().splitlines())


def owner(key, exclude, beside=()):
    """The script (other than `exclude`) whose config has `key`, if any; of several, the one that has the most of the
    keys `beside` it (a config file's others: out_dir alone is prepare_data.py's as well as train.py's)."""
    having = [s for s in scripts() if s not in exclude and key in spec(s)]
    return max(having, key=lambda s: sum(k in spec(s) for k in beside), default=None)


def read_file(path):
    """The assignments of a config file, ({key: value}, {key: line number}): plain `key = expression` lines only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: not Python ({e.msg}): {(e.text or '').strip()}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a config file: not UTF-8 text ({e.reason} at byte {e.start})") from None
    ns, lines = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            line = ast.get_source_segment(path.read_text(), node) or ""
            raise ValueError(f"{path}:{node.lineno}: `{line.splitlines()[0]}` is not a plain `key = value` assignment "
                             f"(config files hold only those)")
        key = node.targets[0].id
        if key in lines:
            raise ValueError(f"{path}:{node.lineno}: {key} is assigned twice (first at line {lines[key]})")
        try:
            ns[key] = eval(compile(ast.Expression(node.value), str(path), "eval"), {**SAFE, **FILE_FUNCS}, dict(ns))
        except Exception as e:
            raise ValueError(f"{path}:{node.lineno}: cannot evaluate {key}: {e}") from None
        lines[key] = node.lineno
    return ns, lines


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --out_dir=out/x


def help_text(doc, keys, scripts):
    out = [(doc or "").strip(), "", "Config keys (--key=value; defaults shown; a config file may set any of them):"]
    width = min(40, max(len(f"--{k}={v.default!r}") for v in keys.values() for k in [v.name]))
    for script in scripts:
        if len(scripts) > 1:
            out.append(f"  {script}:")
        for k in spec(script).values():
            if k.name in keys:
                out.append(f"  {f'--{k.name}={k.default!r}':<{width}}  {k.comment}")
    return "\n".join(out)


def load(argv, script, extends=(), positional=None, doc=None):
    """(config dict, set of keys given explicitly) for `script`: its defaults (and those of the scripts it
    `extends`, e.g. tools/ablate.py runs train.py), then each argument in order: a config file, --key=value, --flag,
    or (if `positional` names a key) a bare word for that key. --help prints the keys and exits 0."""
    scripts = [*extends, script]
    keys = {}
    for s in scripts:
        keys.update(spec(s))
    if "--help" in argv or "-h" in argv:
        print(help_text(doc, keys, scripts))
        raise SystemExit(0)
    cfg = {k: v.default for k, v in keys.items()}
    given, origins = set(), {}

    def unknown(key, origin, beside=()):
        other = owner(key, scripts, beside)
        if other:
            return ValueError(f"{key!r} ({'command line' if origin == 'command line' else 'in ' + origin}) is a key of "
                              f"{other}, not of {script}"
                              + (f": {origin} is a config for {other}" if origin.endswith(".py") else ""))
        near = difflib.get_close_matches(key, keys, n=1)
        where = "on the command line" if origin == "command line" else f"in {origin}"
        if RENAMED.get(key) in keys:
            return ValueError(f"config key {key!r} {where} is now called {RENAMED[key]!r}")
        return ValueError(f"unknown config key {key!r} {where}" + (f" (did you mean {near[0]!r}?)" if near else "")
                          + f"; python {script} --help lists every key")

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if key not in keys:
                raise unknown(key, "command line")
            if not sep and keys[key].types != (bool,):
                raise ConfigError(key, None, "").with_message(f"--{key} needs a value: --{key}=... (a bare --flag is "
                                                              f"only for True/False keys)")
            value = parse_value(text) if sep else True
            if keys[key].types == (bool,) and isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"  # --torch_compile=true as well as --torch_compile=True
            if keys[key].types == (str,) and not isinstance(value, str):
                value = text  # --out_dir=123 is the string "123"
            updates, where = {key: value}, {key: "command line"}
        elif arg.startswith("-"):
            raise ValueError(f"argument {arg!r}: use --key=value (python {script} --help lists every key)")
        elif positional and not arg.endswith(".py") and (not Path(arg).is_file()
                                                         or arg in (keys[positional].choices() or ())):
            updates, where = {positional: arg}, {positional: "command line"}  # a word (a file of its name or not)
        else:
            updates, lines = read_file(arg)
            where = {k: f"{arg}:{n}" for k, n in lines.items()}
            bad = [k for k in updates if k not in keys]
            if bad:
                raise unknown(bad[0], arg, updates)
        for key, value in updates.items():
            try:
                cfg[key] = keys[key].coerce(value)
            except ConfigError as e:
                raise named(e, where[key]) from None
            given.add(key)
            origins[key] = where[key]
    for k, v in cfg.items():
        try:
            keys[k].check(v)
        except ConfigError as e:
            raise named(e, origins.get(k, "command line")) from None
    return cfg, given


def named(e, where):
    """A ConfigError from a config file names the file and line."""
    return e if where == "command line" else ConfigError(e.key, "", "").with_message(f"{where}: {e}")


def main_guard(main, errors=(ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
    """Run main(sys.argv[1:]); a problem in the user's input ends as one `error:` line (exit 1), bugs keep
    their traceback."""
    try:
        return main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C where nothing catches it (train.py's loop saves first): no traceback
        raise SystemExit(130)
    except errors as e:
        if int(os.environ.get("RANK", 0)):  # under torchrun every rank fails the same way: rank 0 says it once
            raise SystemExit(1)
        raise SystemExit(f"error: {e}")
