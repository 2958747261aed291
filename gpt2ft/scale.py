"""PLACEHOLDER (being replaced): LoRA, optimizer checks, T4 presets."""


def choose_presets(config, hardware):
    return config, []


def check_optimizer(optim, hardware):
    return None


def apply_method(model, config):
    total = sum(p.numel() for p in model.parameters())
    return model, {"trainable_parameters": total, "total_parameters": total}


def merge_for_saving(model, config):
    return model, None
