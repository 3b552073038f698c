"""A DeepSeek-V3 model (tiny_deepseek.py's) wrapped as Kimi K2.5 ships its model (training python).

    python kimi_k25_wrap.py SOURCE OUT

OUT holds SOURCE's language model, unchanged, inside Kimi K2.5's multimodal wrapper: config.json
says ``KimiK25ForConditionalGeneration`` / ``kimi_k25`` with the language model's settings under
``text_config`` (``model_type: kimi_k2``) and a tiny vision encoder's under ``vision_config``; the
weights are ``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.*`` and
``mm_projector.*``; ``auto_map`` names the modelling code beside them (``kimi_k25/``, ours), which
transformers, LLaMA-Factory and the engines load with ``trust_remote_code``, as Kimi's own. The
tokenizer and the other files are SOURCE's. Checked before it is kept: loaded back, no missing or
unexpected weight, the same logits as SOURCE.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kimi_k25.configuration_kimi_k25 import KimiK25Config  # noqa: E402
from kimi_k25.modeling_kimi_k25 import KimiK25ForConditionalGeneration  # noqa: E402

CODE = ("configuration_kimi_k25.py", "modeling_kimi_k25.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kimi_k25.KimiK25Config",
    "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
}


def wrap(source: Path, out: Path) -> None:
    torch.manual_seed(1)
    text = json.loads((source / "config.json").read_text())
    text["model_type"] = "kimi_k2"  # what Kimi K2.5's text_config says
    config = KimiK25Config(text_config=text, vision_config={})
    model = KimiK25ForConditionalGeneration(config).to(torch.float32)
    language = DeepseekV3ForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.language_model.load_state_dict(language.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in CODE:
        shutil.copyfile(HERE / "kimi_k25" / name, out / name)
    for side in source.iterdir():
        if side.is_file() and not (out / side.name).exists():
            shutil.copyfile(side, out / side.name)
    written = json.loads((out / "config.json").read_text())
    written.update(architectures=["KimiK25ForConditionalGeneration"], auto_map=AUTO_MAP)
    (out / "config.json").write_text(json.dumps(written, indent=2))
    check(language, out)


def check(language: DeepseekV3ForCausalLM, out: Path) -> None:
    loaded, info = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"the wrapped model does not load whole: {problems}")
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        diff = float((language.eval()(ids).logits - loaded.eval()(ids).logits).abs().max())
    if diff != 0.0:
        raise SystemExit(f"the wrapped model computes otherwise: logits differ by {diff}")


if __name__ == "__main__":
    wrap(Path(sys.argv[1]), Path(sys.argv[2]))
