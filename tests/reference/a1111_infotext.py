# Vendored for the tests from AUTOMATIC1111/stable-diffusion-webui (AGPL-3.0) and
# Mikubill/sd-webui-controlnet (GPL-3.0): the code that writes and reads infotexts, hashes
# model, LoRA and embedding files, and parses <lora:...> tags. Function bodies as written;
# left out only what needs the running web UI (shared.opts, the hash cache file, gradio,
# the model objects), each place marked "[left out: ...]".
#
# Sources:
# - modules/infotext_utils.py @ c19d04436496ab29ddca4758a792831ae41b31de (v1.10):
#   re_param, re_imagesize, quote, unquote, parse_generation_parameters.
# - modules/processing.py @ 9a224a5cb83cbcf75ab0108c03196b8519d29ab6: create_infotext's closing
#   statements (generation_params -> text; unchanged up to v1.10, which calls
#   infotext_utils.quote, the same function as generation_parameters_copypaste.quote).
# - modules/hashes.py (v1.10): calculate_sha256 (also @ 1c7d3dc0ba4eb4ea4b056b175cbaff652be0b031),
#   addnet_hash_safetensors ("kohya-ss hash for safetensors", from kohya's train_util.py).
# - modules/sd_models.py (v1.10) CheckpointInfo: shorthash = sha256[0:10] ("Model hash").
# - extensions-builtin/Lora/network.py @ f2844bd024ff3cf7ee712153a514afd9085980db:
#   NetworkOnDisk's hash (sshs_model_hash metadata, else addnet hash for .safetensors, else the
#   file's sha256) and shorthash = hash[0:12].
# - extensions-builtin/Lora/extra_networks_lora.py (v1.10): activate's multipliers, Lora hashes.
# - modules/textual_inversion/textual_inversion.py (v1.10): embedding.set_hash(sha256(file)),
#   shorthash = hash[0:12]; modules/sd_hijack_clip.py (v1.10): the "TI hashes" text.
# - modules/extra_networks.py @ 0a277ab59183df638650d8373d785c94d14634ed: ExtraNetworkParams,
#   re_extra_net, parse_prompt.
# - Mikubill/sd-webui-controlnet scripts/infotext.py @ 6dc7b4f14d8082d881e4fcd0eaedc30a1e5fc227:
#   field_to_displaytext, displaytext_to_field, parse_value, serialize_unit, parse_unit (a unit
#   is a dict here instead of external_code.ControlNetUnit).
import hashlib
import json
import os
import re
from collections import defaultdict

# ----------------------------------------------------------------------------- infotext_utils.py

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text

    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text

    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields=None):
    res = {}

    prompt = ""
    negative_prompt = ""

    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)

            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")

    # [left out: styles extraction, which needs shared.prompt_styles]

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    # [left out: the UI defaults for fields missing from the text ("Clip skip": "1", "Schedule
    # type": "Automatic", hires fix, inpainting, ...) and infotext_versions.backcompat]
    return res


# ----------------------------------------------------------------------------- processing.py


def create_infotext_text(prompt_text, negative_prompt, generation_params):
    """create_infotext's closing statements, from its generation_params dict. [left out: building
    generation_params from p, shared.opts and the loaded model]"""
    generation_params_text = ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in generation_params.items() if v is not None])

    negative_prompt_text = "\nNegative prompt: " + negative_prompt if negative_prompt else ""

    return f"{prompt_text}{negative_prompt_text}\n{generation_params_text}".strip()


# ----------------------------------------------------------------------------- hashes.py


def calculate_sha256(filename):
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024

    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(blksize), b""):
            hash_sha256.update(chunk)

    return hash_sha256.hexdigest()


def addnet_hash_safetensors(b):
    """kohya-ss hash for safetensors from https://github.com/kohya-ss/sd-scripts/blob/main/library/train_util.py"""
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024

    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")

    offset = n + 8
    b.seek(offset)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)

    return hash_sha256.hexdigest()


def sha256(filename, title, use_addnet_hash=False):
    # [left out: the cache file read and written around this, and --no-hashing]
    if use_addnet_hash:
        with open(filename, "rb") as file:
            sha256_value = addnet_hash_safetensors(file)
    else:
        sha256_value = calculate_sha256(filename)

    return sha256_value


# ----------------------------------------------------------------------------- sd_models.py


def checkpoint_shorthash(filename):
    """CheckpointInfo: self.sha256 = hashes.sha256(self.filename, ...);
    self.shorthash = self.sha256[0:10] if self.sha256 else None"""
    sha = sha256(filename, f"checkpoint/{os.path.basename(filename)}")
    return sha[0:10] if sha else None


# ----------------------------------------------------------------------------- Lora/network.py


def network_on_disk_shorthash(filename, metadata):
    """NetworkOnDisk.__init__ / read_hash / set_hash, for one file and its safetensors metadata."""
    is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
    name = os.path.splitext(os.path.basename(filename))[0]
    hash = metadata.get('sshs_model_hash') or sha256(filename, "lora/" + name, use_addnet_hash=is_safetensors) or ''
    shorthash = hash[0:12]
    return shorthash


# ----------------------------------------------------------------------------- extra_networks_lora.py

remove_symbols = str.maketrans('', '', ":,")


def lora_multipliers(params):
    """ExtraNetworkLora.activate: one params' name and multipliers."""
    name = params.positional[0]

    te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
    te_multiplier = float(params.named.get("te", te_multiplier))

    unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
    unet_multiplier = float(params.named.get("unet", unet_multiplier))

    dyn_dim = int(params.positional[3]) if len(params.positional) > 3 else None
    dyn_dim = int(params.named["dyn"]) if "dyn" in params.named else dyn_dim

    return name, te_multiplier, unet_multiplier, dyn_dim


def lora_hashes_text(mentioned_names_and_shorthashes):
    """ExtraNetworkLora.activate's "Lora hashes" from (item.mentioned_name, shorthash) pairs."""
    lora_hashes = {}
    for mentioned_name, shorthash in mentioned_names_and_shorthashes:
        if shorthash and mentioned_name:
            lora_hashes[mentioned_name.translate(remove_symbols)] = shorthash

    return ", ".join(f"{k}: {v}" for k, v in lora_hashes.items())


# ----------------------------------------------------------------------------- textual_inversion.py, sd_hijack_clip.py


def embedding_shorthash(filepath):
    """create_embedding_from_data: embedding.set_hash(hashes.sha256(filepath, ...) or '');
    Embedding.set_hash: self.shorthash = self.hash[0:12]"""
    return (sha256(filepath, "textual_inversion/" + os.path.basename(filepath)) or '')[0:12]


def ti_hashes_text(used_embeddings, existing=None):
    """FrozenCLIPEmbedderWithCustomWordsBase.forward's "TI hashes" from {name: shorthash}."""
    hashes = []
    for name, shorthash in used_embeddings.items():
        if not shorthash:
            continue

        name = name.replace(":", "").replace(",", "")
        hashes.append(f"{name}: {shorthash}")

    if hashes:
        if existing:
            hashes.append(existing)
        return ", ".join(hashes)


# ----------------------------------------------------------------------------- extra_networks.py


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}

        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        name = m.group(1)
        args = m.group(2)

        res[name].append(ExtraNetworkParams(items=args.split(":")))

        return ""

    prompt = re.sub(re_extra_net, found, prompt)

    return prompt, res


# ----------------------------------------------------------------------------- sd-webui-controlnet scripts/infotext.py


def field_to_displaytext(fieldname: str) -> str:
    return " ".join([word.capitalize() for word in fieldname.split("_")])


def displaytext_to_field(text: str) -> str:
    return "_".join([word.lower() for word in text.split(" ")])


def parse_value(value: str):
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value  # Plain string.


def serialize_unit(unit: dict) -> str:
    log_value = {
        field_to_displaytext(field): value
        for field, value in unit.items()
        if field not in ("image", "enabled") and value != -1
        # Note: exclude hidden slider values.
    }
    if not all("," not in str(v) and ":" not in str(v) for v in log_value.values()):
        # [left out: logger.error]
        return ""

    return ", ".join(f"{field}: {value}" for field, value in log_value.items())


def parse_unit(text: str) -> dict:
    return dict(
        enabled=True,
        **{
            displaytext_to_field(key): parse_value(value)
            for item in text.split(",")
            for (key, value) in (item.strip().split(": "),)
        },
    )
