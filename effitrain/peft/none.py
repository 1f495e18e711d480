"""The `none` PEFT block: every parameter trains."""


def build_none(params, model):
    return model
