"""Named chat templates a recipe can ask for (``chat_template: chatml``): the names mergekit 0.1.5 knows, each
written here to render the same conversation text as mergekit's (tests/test_tokenizer_merge.py renders both),
its quirks included (Llama 3 turns end in a newline after ``<|eot_id|>``), except EXAONE: mergekit's template
leaks its own indentation and blank lines into the prompt; ours renders the format without them.

Formats: ChatML (OpenAI), Llama 3 (Meta), Alpaca (Stanford; ``user_context`` messages become ``### Input:``),
Mistral instruct (``[INST]``; roles must alternate after an optional system message) and EXAONE (LG AI).
Rendered by transformers with ``trim_blocks`` and ``lstrip_blocks`` as every chat template is.
"""

from __future__ import annotations

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
    "{% set headers = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
    "{% for m in messages %}{% if m['role'] in headers %}"
    "{{ '### ' + headers[m['role']] + ':\\n' + (m['content'] | trim) }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{% if loop.first and system is defined %}"
    "{{ ' [INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{% endif %}{% endfor %}"
)

EXAONE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + m['role'] + '|]' + m['content'] }}"
    "{% if m['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3,
                             "mistral": MISTRAL}
