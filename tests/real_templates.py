# ruff: noqa: E501  (template text reads best unbroken)
"""Test data: transcriptions of the chat templates DeepSeek and Moonshot ship, in their
own structure (namespace flags, branch order), written for these tests from reading the
published tokenizer_config.json / chat_template.jinja files. The built-in templates are
written differently; the tests render both and compare character for character.

Each entry: name -> (template, what it is).
"""

_SYS_JOIN = (
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='', is_first_sp=true, is_last_user=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
)
_SYS_LAST = (
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
)
_CALL = (
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'"
)

# V2.5 (Sep 2024) and R1-Distill: the last system message only; calls when content is none
_V25_BODY = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}ANSWER{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}GENERATION{% endif %}"
)
_PLAIN = "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
_DROP = (
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
)

# R1 (Jan 2025; the later copy appends <think>\n): 'tool_calls' in message
_R1_BODY = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}" + _DROP + "{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}GENERATION{% endif %}"
)

# V3-0324 and R1-0528: the Assistant marker right after each user turn
_0324_BODY = (
    "{%- for message in messages %}CONTENT{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + message['content'] + '<｜Assistant｜>'}}{%- endif %}DROP"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and "
    "message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if TEXT is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- else %}{{TEXT + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + "
    + _CALL
    + "}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or "
    "message['tool_calls'] is none)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + TEXT + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = TEXT %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + TEXT + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + TEXT + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}"
    "{{'<｜Assistant｜>'}}{% endif %}"
)


def _fill(s: str, **kw: str) -> str:
    for k, v in kw.items():
        s = s.replace(k, v)
    return s


_HEAD = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"

# V3.1: the earlier copy (Aug 2025) and DeepSeek's later one (is_only_sys / is_prefix)
_V31_BODY = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and "
    "message['tool_calls'] is not none %}{%- if ns.is_last_user ONLYSYS %}"
    "{{'<｜Assistant｜></think>'}}{%- endif %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if message['content'] is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ "
    "tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + "
    "'<｜tool▁call▁end｜>'}}{%- else %}{{message['content'] + "
    "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + "
    "tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] "
    "+ '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or "
    "message['tool_calls'] is none) %}{%- if ns.is_last_user %}{{'<｜Assistant｜>'}}"
    "{%- if message['prefix'] is defined and message['prefix'] and thinking %}{{'<think>'}}"
    "{%- else %}{{'</think>'}}{%- endif %}{%- endif %}PREFIX{%- set ns.is_last_user = false -%}"
    "{%- if ns.is_tool %}{{message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>', 1)[1] -%}"
    "{%- endif %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_tool = true -%}{{'<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}NOTSYS{%- endfor -%}TAIL"
)
_V31_SYS = (
    "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, "
    "is_last_user=false, is_only_sys=false, is_prefix=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "SETSYS{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
)

V31_EARLY = (
    _HEAD
    + _fill(_V31_SYS, SETSYS="")
    + _fill(
        _V31_BODY,
        ONLYSYS="",
        PREFIX="",
        NOTSYS="",
        TAIL="{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool %}"
        "{{'<｜Assistant｜>'}}{%- if not thinking %}{{'</think>'}}{%- else %}{{'<think>'}}"
        "{%- endif %}{% endif %}",
    )
)
V31_LATER = (
    _HEAD
    + _fill(_V31_SYS, SETSYS="{% set ns.is_only_sys = true %}")
    + _fill(
        _V31_BODY,
        ONLYSYS="or ns.is_only_sys",
        PREFIX="{%- if message['prefix'] is defined and message['prefix'] %}"
        "{%- set ns.is_prefix = true -%}{%- endif %}",
        NOTSYS="{%- if message['role'] != 'system' %}{% set ns.is_only_sys = false %}{%- endif %}",
        TAIL="{% if add_generation_prompt and not ns.is_tool%}{% if ns.is_last_user or "
        "ns.is_only_sys or not ns.is_prefix %}{{'<｜Assistant｜>'}}{%- if not thinking %}"
        "{{'</think>'}}{%- else %}{{'<think>'}}{%- endif %}{% endif %}{% endif %}",
    )
)

V2_CHAT = (
    _HEAD + "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
V2_5 = _HEAD + _SYS_LAST + _fill(_V25_BODY, ANSWER=_PLAIN, GENERATION="{{'<｜Assistant｜>'}}")
R1_DISTILL = (
    _HEAD + _SYS_LAST + _fill(_V25_BODY, ANSWER=_DROP, GENERATION="{{'<｜Assistant｜><think>\\n'}}")
)
# V3 of December 2024: V2.5's body with every system message joined
V3_DEC = _HEAD + _SYS_JOIN + _fill(_V25_BODY, ANSWER=_PLAIN, GENERATION="{{'<｜Assistant｜>'}}")
R1_JAN = _HEAD + _SYS_JOIN + _fill(_R1_BODY, GENERATION="{{'<｜Assistant｜>'}}")
R1_LATER = _HEAD + _SYS_JOIN + _fill(_R1_BODY, GENERATION="{{'<｜Assistant｜><think>\\n'}}")
V3_0324 = _HEAD + _SYS_JOIN + _fill(_0324_BODY, CONTENT="", DROP="", TEXT="message['content']")
R1_0528 = (
    _HEAD
    + _SYS_JOIN
    + _fill(
        _0324_BODY,
        CONTENT="{% set content = message['content'] %}",
        DROP="{%- if message['role'] == 'assistant' %}{% if '</think>' in content %}"
        "{% set content = content.split('</think>')[-1] %}{% endif %}{% endif %}",
        TEXT="content",
    )
)

# Kimi K2-Instruct (the 2025-08 chat_template.jinja) and K2-Thinking
_KIMI_MACROS = (
    "{%- macro render_content(msg) -%}{%- set c = msg.get('content') -%}"
    "{%- if c is string -%}{{ c }}{%- elif c is not none -%}{% for content in c -%}"
    "{{ content['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{% macro set_roles(message) -%}{%- set role_name = message.get('name') or message['role'] -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>{{role_name}}<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{role_name}}<|im_middle|>"
    "{%- else -%}<|im_system|>{{role_name}}<|im_middle|>{%- endif -%}{%- endmacro -%}"
    "{%- macro render_toolcalls(message) -%}<|tool_calls_section_begin|>"
    "{%- for tool_call in message['tool_calls'] -%}{%- set formatted_id = tool_call['id'] -%}"
    "<|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>"
    "{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}"
    "{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>{%- endmacro -%}"
)
_KIMI_DEFAULT_SYS = (
    "{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "{%- endif -%}"
)
_KIMI_TOOL = (
    "{%- elif message['role'] == 'tool' -%}{%- set tool_call_id = message.tool_call_id -%}"
    "## Return of {{ tool_call_id }}\n{{render_content(message)}}"
    "{%- elif message['content'] is not none -%}{{render_content(message)}}{%- endif -%}<|im_end|>"
)
KIMI_K2 = (
    _KIMI_MACROS
    + "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}"
    "<|im_end|>{%- endif -%}"
    + _KIMI_DEFAULT_SYS
    + "{%- for message in messages -%}{{set_roles(message)}}"
    "{%- if message['role'] == 'assistant' -%}{{render_content(message)}}"
    "{%- if message.get('tool_calls') -%}{{render_toolcalls(message)}}{%- endif -%}"
    + _KIMI_TOOL
    + "{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- endif -%}"
)
KIMI_K2_THINKING = (
    _KIMI_MACROS + "{%- set ns = namespace(last_non_tool_call_assistant_msg=-1) -%}"
    "{%- for idx in range(messages|length-1, -1, -1) -%}"
    "{%- if messages[idx]['role'] == 'assistant' and not messages[idx].get('tool_calls') -%}"
    "{%- set ns.last_non_tool_call_assistant_msg = idx -%}{%- break -%}{%- endif -%}{%- endfor -%}"
    "{%- set hist_msgs = messages[:ns.last_non_tool_call_assistant_msg+1] -%}"
    "{%- set suffix_msgs = messages[ns.last_non_tool_call_assistant_msg+1:] -%}"
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson() }}<|im_end|>"
    "{%- endif -%}" + _KIMI_DEFAULT_SYS + "{%- for message in hist_msgs -%}{{set_roles(message)}}"
    "{%- if message['role'] == 'assistant' -%}<think></think>{{render_content(message)}}"
    "{%- if message.get('tool_calls') -%}{{render_toolcalls(message)}}{%- endif -%}"
    + _KIMI_TOOL
    + "{%- endfor -%}{%- for message in suffix_msgs -%}{{set_roles(message)}}"
    "{%- if message['role'] == 'assistant' -%}{%- set rc = message.get('reasoning_content', '') -%}"
    "<think>{{rc}}</think>{{render_content(message)}}"
    "{%- if message.get('tool_calls') -%}{{render_toolcalls(message)}}{%- endif -%}"
    + _KIMI_TOOL
    + "{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- endif -%}"
)

REAL = {
    "V2-Chat": V2_CHAT,
    "V2.5": V2_5,
    "V3 (Dec 2024)": V3_DEC,
    "V3-0324": V3_0324,
    "R1 (Jan 2025)": R1_JAN,
    "R1 (Feb 2025)": R1_LATER,
    "R1-0528": R1_0528,
    "R1-Distill": R1_DISTILL,
    "V3.1 (Aug 2025)": V31_EARLY,
    "V3.1 (later)": V31_LATER,
    "Kimi-K2-Instruct": KIMI_K2,
    "Kimi-K2-Thinking": KIMI_K2_THINKING,
}
