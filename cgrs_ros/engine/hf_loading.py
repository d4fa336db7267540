"""Loading Hugging Face transformers models for the engine's local model backends.

The captioner and the reranker (``transformers`` and ``itm`` backends) load models the same
way: a model id or a local ``save_pretrained`` folder, no downloads, a device and dtype from
the config, and the same translation of transformers' exceptions into one-sentence errors that
say what to fix. Keeping that in one place means a fix to device handling or to an error
message reaches every backend; each caller passes the name of its own config section
(``captioner`` or ``reranker``) so the messages point at the key the user has to edit.
"""

import contextlib
import inspect
import os

from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from cgrs_ros.engine.torch_compat import ensure_torchvision


def resolve_device(torch, device, section):
    """Turn a config device ('auto', 'cpu', 'cuda', 'cuda:N') into a torch device string."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{section}.device {device!r} is not a device; use 'auto', 'cpu' or 'cuda:N'.")
    if resolved.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(
            f'{section}.device is {device!r} but torch sees no CUDA GPU here; use cpu or auto.')
    return str(resolved)


def resolve_dtype(torch, dtype, device):
    """Return the torch dtype for a config dtype ('auto': float32 on CPU, bf16/fp16 on GPU)."""
    if dtype == 'auto':
        if not device.startswith('cuda'):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def load_error(model, exc, section, what):
    """Return the ModelLoadError for a model that is neither a loadable folder nor cached."""
    where = (f'the directory {model!r} has no loadable model ({exc})' if os.path.isdir(model)
             else f'{model!r} is not a local directory and is not in the Hugging Face cache '
                  '(downloads are off here)')
    return ModelLoadError(
        f'Cannot load {what}: {where}; on a machine with internet run '
        f'`hf download {model} --local-dir DIR`, copy DIR here and set {section}.model to it.')


def check_model_folder(model, section, what):
    """Raise ModelLoadError for a local folder that save_pretrained did not write."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, 'config.json')):
        raise ModelLoadError(
            f'Cannot load {what}: the directory {model!r} has no config.json; point '
            f'{section}.model at the folder that save_pretrained or `hf download MODEL '
            '--local-dir DIR` wrote.')


@contextlib.contextmanager
def loading_errors(model, section, what, trust_remote_code, kind):
    """Translate transformers' loading exceptions into ConfigError / ModelLoadError.

    ``kind`` is a pair (what the model should be, what to use instead), both noun phrases, for
    the message about a model of the wrong type.
    """
    try:
        yield
    except OSError as exc:
        raise load_error(model, exc, section, what) from None
    except ValueError as exc:
        if 'trust_remote_code' in str(exc) and not trust_remote_code:
            raise ConfigError(
                f'{what} {model!r} ships its own Python code; set {section}.trust_remote_code: '
                'true if you trust its source, or use a checkpoint that transformers supports '
                'natively.') from None
        if 'Unrecognized' in str(exc) or 'not supported' in str(exc):
            raise ModelLoadError(
                f'Cannot load {what} {model!r}: it is not {kind[0]} that transformers knows '
                f'({str(exc).splitlines()[0]}); use {kind[1]}.') from None
        raise


def load_model(settings, section, what, kind, model_class=None):
    """Load ``settings.model`` as (torch, processor, model, device), model in eval mode.

    ``kind`` is as for :func:`loading_errors`. ``model_class`` is a transformers class (default
    ``AutoModelForImageTextToText``) or a function of the checkpoint's ``PretrainedConfig`` that
    returns one, so a backend can choose the head from the checkpoint's own config.
    """
    model = settings.model
    if not model:
        raise ConfigError(
            f'{section}.model is empty; set it to a Hugging Face model id or a local model '
            'directory.')
    ensure_torchvision()
    import torch
    import transformers

    device = resolve_device(torch, settings.device, section)
    check_model_folder(model, section, what)
    kwargs = {'trust_remote_code': settings.trust_remote_code}
    with loading_errors(model, section, what, settings.trust_remote_code, kind):
        if model_class is None:
            model_class = transformers.AutoModelForImageTextToText
        elif not hasattr(model_class, 'from_pretrained'):
            model_class = model_class(transformers.AutoConfig.from_pretrained(model, **kwargs))
        processor = transformers.AutoProcessor.from_pretrained(model, **kwargs)
        loaded = model_class.from_pretrained(
            model, dtype=resolve_dtype(torch, settings.dtype, device), **kwargs)
    loaded.to(device).eval()
    return torch, processor, loaded, device


def processor_tokenizer(processor, model, section, what, needed_for):
    """Return the processor's tokenizer (ModelLoadError naming ``needed_for`` if it has none)."""
    tokenizer = getattr(processor, 'tokenizer', None)
    if tokenizer is None:
        raise ModelLoadError(
            f'Cannot use {what} {model!r}: its processor has no tokenizer, so {needed_for}; '
            'use a model directory with tokenizer files.')
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unused_input_keys(model):
    """Return processor outputs the model's forward() does not take (e.g. token_type_ids)."""
    accepted = inspect.signature(model.forward).parameters
    return {'token_type_ids'} - set(accepted)


def to_model(inputs, model, device, drop_keys=()):
    """Move processor outputs to the model's device, pixel values in the model's dtype."""
    for key in drop_keys:
        inputs.pop(key, None)
    inputs = inputs.to(device)
    if 'pixel_values' in inputs and inputs['pixel_values'].is_floating_point():
        inputs['pixel_values'] = inputs['pixel_values'].to(model.dtype)
    return inputs


def conversation(image, text, system=None):
    """Return a one-turn chat (optional system turn; user turn = the image(s), then text).

    ``image`` is one image or a tuple of them (an image goal: the photo, then the candidate).
    """
    images = image if isinstance(image, tuple) else (image,)
    messages = []
    if system:
        messages.append({'role': 'system', 'content': [{'type': 'text', 'text': system}]})
    messages.append({'role': 'user', 'content': [
        *({'type': 'image', 'image': one} for one in images), {'type': 'text', 'text': text}]})
    return messages


def apply_chat_template(processor, conversations):
    """Tokenize chats with their images, generation prompt added, padded to one batch."""
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors='pt', processor_kwargs={'padding': True})
