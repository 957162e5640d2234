"""The projections of cotune's models that carry a LoRA pool, by name. Free of torch, so that
the planner and other torch-free code count and check them from the one list."""

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # of dense and shared-expert MLPs
LORA_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
