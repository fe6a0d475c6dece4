r"""Built-in chat templates: each family's format, for checkpoints that ship without one.

They write what the family's own template writes (checked character for character against
transcriptions of DeepSeek's and Moonshot's templates in tests/test_formats_templates.py):

- v2      V2-Chat, V2-Lite-Chat: `<bos>{system}\n\nUser: {u}\n\nAssistant: {a}<eos>`
- v2.5    V2.5, Coder-V2-0724: `<bos>{system}<｜User｜>{u}<｜Assistant｜>{a}<eos>`; only the
          LAST system message is kept; tool calls in ```json fences
- v3      V3 / V3-0324: as v2.5, system messages joined by a blank line
- r1      R1 (the template DeepSeek published in February 2025): as v3, history drops the
          text up to `</think>`, the prompt ends `<｜Assistant｜><think>\n`
- r1-0528 R1-0528 (and R1 of January 2025): every user turn ends `<｜Assistant｜>`, no
          `<think>` opened by the prompt (the model writes it)
- v3.1    V3.1 / V3.1-Terminus (DeepSeek's later V3.1 template): `<｜Assistant｜></think>`
          (non-thinking) or `<think>` (thinking); a conversation that ends with an assistant
          turn or holds only system messages still gets the generation prompt
- kimi    Kimi K2-Instruct: `<|im_system|>system<|im_middle|>...<|im_end|>`, a
          `tool_declare` turn for tools, `## Return of {id}` tool results
- kimi-thinking  K2-Thinking / K2.5: as kimi, assistant turns carry `<think>...</think>`
          (reasoning kept only after the last plain assistant turn)

Where DeepSeek's own templates have bugs in multi-call tool histories (V2.5 and V3 of
December 2024 close a tool-call block only after its second call; V2.5, V3 and R1 never
reset their "first call" / "first output" flags, so a second tool round loses its opening
markers), the built-ins write what the later, fixed templates (V3-0324, R1-0528) write.
"""

from __future__ import annotations

# The system prompt: every system message joined by a blank line (V3, R1, V3.1) ...
_SYSTEM_JOINED = r"""
{%- set sys = namespace(text='', seen=false) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set sys.text = sys.text + ('\n\n' if sys.seen else '') + (m['content'] or '') -%}
  {%- set sys.seen = true -%}
{%- endfor -%}
{{- bos_token + sys.text -}}
"""
# ... or only the last one (V2.5, R1-Distill)
_SYSTEM_LAST = r"""
{%- set sys = namespace(text='') -%}
{%- for m in messages if m['role'] == 'system' -%}{%- set sys.text = m['content'] or '' -%}
{%- endfor -%}
{{- bos_token + sys.text -}}
"""

# One ```json-fenced call (V2.5, V3, R1); `k` is its index in the message's calls.
_FENCED_CALL = r"""
{%- macro fenced(call, k) -%}
  {{- ('\n' if k else '') + '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>'
      + call['function']['name'] + '\n```json\n' + call['function']['arguments']
      + '\n```<｜tool▁call▁end｜>' -}}
{%- endmacro -%}
"""

_V2 = r"""
{{- bos_token -}}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{{- m['content'] + '\n\n' -}}
  {%- elif m['role'] == 'user' -%}{{- 'User: ' + m['content'] + '\n\n' -}}
  {%- elif m['role'] == 'assistant' -%}{{- 'Assistant: ' + (m['content'] or '') + eos_token -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}
"""

# V2.5 and R1 share one shape: the Assistant marker opens each answer; tool results sit
# between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>, and the answer that follows
# them has no Assistant marker. R1 drops the reasoning (text up to </think>) from history.
_MARKER_PER_ANSWER = r"""
{%- set st = namespace(tool=false, outputs=0) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}
    {%- set st.tool = false -%}{{- '<｜User｜>' + m['content'] -}}
  {%- elif m['role'] == 'assistant' and m['tool_calls'] -%}
    {{- '<｜tool▁outputs▁end｜>' if st.tool else '<｜Assistant｜>' -}}
    {%- set st.tool = false -%}{%- set st.outputs = 0 -%}
    {{- (m['content'] or '') + '<｜tool▁calls▁begin｜>' -}}
    {%- for call in m['tool_calls'] -%}{{- fenced(call, loop.index0) -}}{%- endfor -%}
    {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
  {%- elif m['role'] == 'assistant' -%}
    {%- if st.tool -%}
      {{- '<｜tool▁outputs▁end｜>' + m['content'] + '<｜end▁of▁sentence｜>' -}}
      {%- set st.tool = false -%}
    {%- else -%}
      {{- '<｜Assistant｜>' + ANSWER + '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
  {%- elif m['role'] == 'tool' -%}
    {%- set st.tool = true -%}
    {{- ('<｜tool▁outputs▁begin｜>' if st.outputs == 0 else OUTPUT_SEP)
        + '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}
    {%- set st.outputs = st.outputs + 1 -%}
  {%- endif -%}
{%- endfor -%}
{%- if st.tool -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}
{%- if add_generation_prompt and not st.tool -%}{{- GENERATION -}}{%- endif -%}
"""

# V3-0324 and R1-0528: each user turn ends with the Assistant marker itself.
_MARKER_AFTER_USER = r"""
{%- set st = namespace(tool=false, last_user=false, outputs=0) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}
    {%- set st.tool = false -%}{%- set st.last_user = true -%}
    {{- '<｜User｜>' + m['content'] + '<｜Assistant｜>' -}}
  {%- elif m['role'] == 'assistant' -%}
    {%- set st.last_user = false -%}
    {%- set text = ANSWER -%}
    {%- if m['tool_calls'] -%}
      {{- ('<｜tool▁outputs▁end｜>' if st.tool else '') + text + '<｜tool▁calls▁begin｜>' -}}
      {%- for call in m['tool_calls'] -%}{{- fenced(call, loop.index0) -}}{%- endfor -%}
      {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
      {%- set st.outputs = 0 -%}
    {%- else -%}
      {{- ('<｜tool▁outputs▁end｜>' if st.tool else '') + text + '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
    {%- set st.tool = false -%}
  {%- elif m['role'] == 'tool' -%}
    {%- set st.last_user = false -%}{%- set st.tool = true -%}
    {{- ('<｜tool▁outputs▁begin｜>' if st.outputs == 0 else '\n')
        + '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}
    {%- set st.outputs = st.outputs + 1 -%}
  {%- endif -%}
{%- endfor -%}
{%- if st.tool -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}
{%- if add_generation_prompt and not st.last_user and not st.tool -%}
  {{- '<｜Assistant｜>' -}}
{%- endif -%}
"""

_V3_1 = r"""
{%- set think = thinking if thinking is defined
      else (enable_thinking is defined and enable_thinking) -%}
{%- set st = namespace(tool=false, last_user=false, only_sys=false, prefix=false) -%}
{%- for m in messages if m['role'] == 'system' -%}{%- set st.only_sys = true -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}
    {%- set st.tool = false -%}{%- set st.last_user = true -%}{{- '<｜User｜>' + m['content'] -}}
  {%- elif m['role'] == 'assistant' and m['tool_calls'] -%}
    {{- '<｜Assistant｜></think>' if st.last_user or st.only_sys else '' -}}
    {%- set st.last_user = false -%}{%- set st.tool = false -%}
    {{- (m['content'] or '') + '<｜tool▁calls▁begin｜>' -}}
    {%- for call in m['tool_calls'] -%}
      {{- '<｜tool▁call▁begin｜>' + call['function']['name'] + '<｜tool▁sep｜>'
          + call['function']['arguments'] + '<｜tool▁call▁end｜>' -}}
    {%- endfor -%}
    {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
  {%- elif m['role'] == 'assistant' -%}
    {%- if st.last_user -%}
      {{- '<｜Assistant｜>' + ('<think>' if m['prefix'] and think else '</think>') -}}
    {%- endif -%}
    {%- if m['prefix'] -%}{%- set st.prefix = true -%}{%- endif -%}
    {%- set st.last_user = false -%}
    {%- set text = m['content'] -%}
    {%- if not st.tool and '</think>' in text -%}{%- set text = text.split('</think>', 1)[1] -%}
    {%- endif -%}
    {%- set st.tool = false -%}{{- text + '<｜end▁of▁sentence｜>' -}}
  {%- elif m['role'] == 'tool' -%}
    {%- set st.last_user = false -%}{%- set st.tool = true -%}
    {{- '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}
  {%- endif -%}
  {%- if m['role'] != 'system' -%}{%- set st.only_sys = false -%}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not st.tool
      and (st.last_user or st.only_sys or not st.prefix) -%}
  {{- '<｜Assistant｜>' + ('<think>' if think else '</think>') -}}
{%- endif -%}
"""

# Kimi: three turn markers, the role name, <|im_middle|>, the body, <|im_end|>.
_KIMI = r"""
{%- macro body(m) -%}{{- m['content'] or '' -}}{%- endmacro -%}
{%- macro opening(m) -%}
  {%- set name = m['name'] or m['role'] -%}
  {%- if m['role'] == 'user' -%}{{- '<|im_user|>' + name + '<|im_middle|>' -}}
  {%- elif m['role'] == 'assistant' -%}{{- '<|im_assistant|>' + name + '<|im_middle|>' -}}
  {%- else -%}{{- '<|im_system|>' + name + '<|im_middle|>' -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro calls(m) -%}
  {{- '<|tool_calls_section_begin|>' -}}
  {%- for call in m['tool_calls'] -%}
    {{- '<|tool_call_begin|>' + call['id'] + '<|tool_call_argument_begin|>'
        + call['function']['arguments'] + '<|tool_call_end|>' -}}
  {%- endfor -%}
  {{- '<|tool_calls_section_end|>' -}}
{%- endmacro -%}
{%- set plain = namespace(last=-1) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'assistant' and not m['tool_calls'] -%}{%- set plain.last = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {{- '<|im_system|>tool_declare<|im_middle|>' + (tools | tojson(separators=TOOL_SEPARATORS))
      + '<|im_end|>' -}}
{%- endif -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
  {{- '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.'
      + '<|im_end|>' -}}
{%- endif -%}
{%- for m in messages -%}
  {{- opening(m) -}}
  {%- if m['role'] == 'assistant' -%}
    {%- if THINKING -%}
      {{- '<think>' + ((m['reasoning_content'] or '') if loop.index0 > plain.last else '')
          + '</think>' -}}
    {%- endif -%}
    {{- body(m) -}}{%- if m['tool_calls'] -%}{{- calls(m) -}}{%- endif -%}
  {%- elif m['role'] == 'tool' -%}
    {{- '## Return of ' + m['tool_call_id'] + '\n' + body(m) -}}
  {%- else -%}{{- body(m) -}}
  {%- endif -%}
  {{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}
"""


def _fill(template: str, **parts: str) -> str:
    for key, value in parts.items():
        template = template.replace(key, value)
    return template.strip()


_AS_IS = "(m['content'] or '')"
_NO_REASONING = "(m['content'] or '').split('</think>')[-1]"

BUILTIN_TEMPLATES: dict[str, str] = {
    "v2": _V2.strip(),
    "v2.5": _FENCED_CALL.strip()
    + _SYSTEM_LAST.strip()
    + _fill(_MARKER_PER_ANSWER, ANSWER=_AS_IS, OUTPUT_SEP="'\\n'", GENERATION="'<｜Assistant｜>'"),
    "v3": _FENCED_CALL.strip() + _SYSTEM_JOINED.strip() + _fill(_MARKER_AFTER_USER, ANSWER=_AS_IS),
    "r1": _FENCED_CALL.strip()
    + _SYSTEM_JOINED.strip()
    + _fill(
        _MARKER_PER_ANSWER,
        ANSWER=_NO_REASONING,
        OUTPUT_SEP="''",
        GENERATION="'<｜Assistant｜><think>\\n'",
    ),
    "r1-0528": _FENCED_CALL.strip()
    + _SYSTEM_JOINED.strip()
    + _fill(_MARKER_AFTER_USER, ANSWER=_NO_REASONING),
    "v3.1": _SYSTEM_JOINED.strip() + _V3_1.strip(),
    "kimi": _fill(_KIMI, THINKING="false", TOOL_SEPARATORS="(',', ':')"),
    "kimi-thinking": _fill(_KIMI, THINKING="true", TOOL_SEPARATORS="none"),
}
