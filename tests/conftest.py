"""Shared test fixtures: tiny random Llama-family checkpoints and real PEFT adapters."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The switch is read when a function is
# decorated, Triton's own library functions included, so it is set before anything (such as
# transformers) can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("COTUNE_REGISTRY", None)  # a test's registry is the one it opens, never the shell's

# One table of tolerances, keyed by dtype: max abs difference of logits against a reference.
LOGIT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)

# Tiny configs of every supported family, with the features that set them apart.
FAMILIES = {
    "llama2": dict(model_type="llama", tie_word_embeddings=False),
    "llama3-rope": dict(model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "qwen2-bias": dict(model_type="qwen2", tie_word_embeddings=True),
    "smollm2-tied": dict(model_type="llama", tie_word_embeddings=True, head_dim=16),
}


@pytest.fixture
def seed(request) -> int:
    """The seed of this test's random inputs: COTUNE_TEST_SEED or a fixed default, printed
    on failure so a failing draw can be replayed."""
    value = int(os.environ.get("COTUNE_TEST_SEED", "1234"))
    torch.manual_seed(value)
    random.seed(value)
    yield value
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"\nreplay with COTUNE_TEST_SEED={value}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def tiny_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random transformers model of `family` (float32, eval mode)."""
    fields = dict(TINY, **FAMILIES[family])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers zero-inits biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def hf_checkpoint(tmp_path, family):
    """(transformers model, checkpoint directory) of a tiny random model of `family`."""
    model = tiny_hf_model(family)
    path = tmp_path / f"base-{family}"
    model.save_pretrained(path)
    return model, path


def make_peft_adapter(base: torch.nn.Module, path, *, r: int, alpha: float,
                      targets: list[str], rslora: bool = False, seed: int = 0,
                      std: float = 0.1, dora: bool = False):
    """Saves a real PEFT LoRA adapter of `base` with random A and B to `path`; returns its
    LoraConfig. With `dora`, a DoRA adapter: its magnitudes, PEFT's (the base's row norms),
    each moved by a random 20% or so."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM", use_dora=dora)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    peft_model.save_pretrained(path)
    return config


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter_specs(count: int, rng: random.Random) -> list[dict]:
    """`count` adapters as tenants make them: mixed ranks 1..64, target subsets, rsLoRA."""
    specs = []
    for i in range(count):
        r = rng.choice([1, 2, 7, 8, 16, 33, 64])
        targets = rng.sample(ALL_TARGETS, rng.randint(1, len(ALL_TARGETS)))
        specs.append(dict(r=r, alpha=rng.choice([1, 8, 16, 32]), targets=targets,
                          rslora=rng.random() < 0.4, seed=rng.randint(0, 10**6) + i))
    return specs


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(transformers model loaded from the embedded GGUF, cotune's converted checkpoint dir).
    Session-wide: the real model loads once for every test that needs it."""
    from cotune.model.default_model import default_gguf_path
    from cotune.model.gguf_convert import cached_checkpoint

    gguf_file = default_gguf_path()
    checkpoint = cached_checkpoint(gguf_file, tmp_path_factory.mktemp("cotune-cache"))
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    return hf_model, checkpoint


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"]):
    """A real byte-level BPE tokenizer with a ChatML template, trained here on a few lines so
    that its ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the cat sat on the mat", "a capital city of a country", "user assistant system",
              "what is the answer? the answer is forty two."] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(transformers model, directory) of a tiny Llama checkpoint with its own tokenizer:
    a whole model directory, as Runtime.load takes it."""
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    model = tiny_hf_model("llama2")
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def admin(server):
    """The admin of the module's `server` fixture (a RunningServer), as a wire Caller."""
    from wire import Caller

    caller = Caller(server.address, server.admin_token)
    yield caller
    caller.close()
