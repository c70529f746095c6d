"""Chat templates: rendering `messages` with a tokenizer's Jinja chat
template (sandboxed), as Hugging Face's `apply_chat_template` does.
"""

import datetime
import json

ROLES = ("system", "user", "assistant")

__all__ = ["ROLES", "chat_template", "render_chat"]


def chat_template(lm):
    """The chat template `kft.build_causal_lm` recorded on `lm`, or None."""
    template = getattr(lm, "chat_template", None)
    return template if isinstance(template, str) and template else None


def _raise_template_error(message):
    raise ValueError(f"The chat template refused the conversation: {message}")


def _compile_template(template):
    """A Jinja template in a sandbox, with the globals HF templates use."""
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("format='messages' renders the checkpoint's chat "
                          "template with Jinja, and jinja2 is not installed: "
                          "pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = (
        lambda fmt: datetime.datetime.now().strftime(fmt))
    env.filters["tojson"] = (
        lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False,
                                                   indent=indent))
    return env.from_string(template)


class ChatRenderer:
    """Renders conversations with a template and finds the assistant turns."""

    def __init__(self, template, tokenizer):
        self.template = _compile_template(template)
        self.variables = {
            name: getattr(tokenizer, attribute, None) for name, attribute in (
                ("bos_token", "start_token"), ("eos_token", "end_token"),
                ("pad_token", "pad_token"), ("unk_token", "unk_token"))}

    def render(self, messages, add_generation_prompt=False):
        return self.template.render(messages=messages,
                                    add_generation_prompt=add_generation_prompt,
                                    **self.variables)

    def segments(self, messages, index):
        """`[(text, is_assistant), ...]` whose texts join to the full render.

        An assistant turn is what rendering it adds after the generation
        prompt of the conversation before it (HF's `add_generation_prompt`).
        """
        full = self.render(messages)
        segments, start = [], 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:turn], add_generation_prompt=True)
            upto = self.render(messages[:turn + 1])
            if not (upto.startswith(head) and full.startswith(upto)
                    and len(head) >= start):
                raise ValueError(
                    f"Record {index}: the chat template does not render the "
                    "conversation turn by turn (a conversation's render is not "
                    "a prefix of a longer one's), so kft cannot find assistant "
                    f"turn {turn}. Use format='prompt_completion' instead.")
            segments += [(full[start:len(head)], False),
                         (full[len(head):len(upto)], True)]
            start = len(upto)
        segments.append((full[start:], False))
        return segments


def render_chat(lm, messages, *, add_generation_prompt=True, template=None):
    """A conversation as the text `lm.generate` continues.

    Renders `lm`'s chat template (or `template`) and drops a leading start
    token that `lm`'s preprocessor adds again, so generation sees the
    tokens training saw.

    Args:
        lm: a keras-hub `CausalLM` (from `kft.build_causal_lm`).
        messages: `[{"role": "system" | "user" | "assistant", "content": str}]`.
        add_generation_prompt: end with the assistant turn's header.
        template: a Jinja chat template; default `lm.chat_template`.

    Returns:
        The prompt string.

    Example:

    ```python
    prompt = kft.sft.render_chat(lm, [{"role": "user", "content": "Hi!"}])
    lm.generate(prompt, max_length=64)
    ```
    """
    tokenizer = lm.preprocessor.tokenizer
    renderer = ChatRenderer(require_template(lm, template), tokenizer)
    text = renderer.render(check_messages(messages, 0),
                           add_generation_prompt=add_generation_prompt)
    start = getattr(tokenizer, "start_token", None)
    if (start and getattr(lm.preprocessor, "add_start_token", False)
            and text.startswith(start)):
        text = text[len(start):]
    return text


def require_template(lm, template):
    template = template or chat_template(lm)
    if not template:
        raise ValueError(
            "format='messages' needs a chat template, and this model has none "
            "(keras-hub presets carry none; kft.build_causal_lm reads one from "
            "a Hugging Face checkpoint's tokenizer_config.json). Pass "
            "chat_template=<Jinja string>, or use format='prompt_completion'.")
    return template


def check_messages(messages, index):
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # a CSV cell
        except ValueError:
            pass
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"Record {index}: 'messages' must be a non-empty list of "
                         f"{{'role', 'content'}} dicts. Received: {messages!r:.80}")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(
                message.get("content"), str):
            raise ValueError(f"Record {index}, message {turn}: a message is a "
                             "dict with a 'role' and a string 'content'. "
                             f"Received: {message!r:.80}")
        if message.get("role") not in ROLES:
            raise ValueError(f"Record {index}, message {turn}: unknown role "
                             f"{message.get('role')!r}. Allowed roles: {ROLES}")
    return messages


# === Examples: segments -> tokens -> rows ===
