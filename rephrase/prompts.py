"""WRAP prompts (Maini et al. 2024; docs/ALGORITHMS.md section 4): the shared preamble and the four styles verbatim.

A prompt is built with the generator's own chat template when it has one: the preamble goes in the system turn
when the template accepts one (`system_turn`), otherwise in front of the user turn; without a chat template the
paper's plain `USER:` / `ASSISTANT:` layout is used.
"""

from __future__ import annotations

from dataclasses import dataclass

PREAMBLE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the questions."
)


@dataclass(frozen=True)
class Style:
    name: str
    instruction: str
    source_prefix: str


STYLES: dict[str, Style] = {
    "easy": Style(
        "easy",
        "For the following paragraph give me a paraphrase of the same using a very small vocabulary and extremely "
        "simple sentences that a toddler will understand:",
        "easy",
    ),
    "medium": Style(
        "medium",
        "For the following paragraph give me a diverse paraphrase of the same in high quality English language as "
        "in sentences on Wikipedia:",
        "wiki",
    ),
    "hard": Style(
        "hard",
        "For the following paragraph give me a paraphrase of the same using very terse and abstruse language that "
        "only an erudite scholar will understand. Replace simple words and phrases with rare and complex ones:",
        "hard",
    ),
    "qa": Style(
        "qa",
        'Convert the following paragraph into a conversational format with multiple tags of "Question:" followed '
        'by "Answer:":',
        "qa",
    ),
}
ALIASES = {"wikipedia": "medium", "wiki": "medium"}


def resolve_styles(names: list[str], custom: dict[str, str] | None = None) -> list[Style]:
    """Styles by name (built-in, alias or a user style from the config: name -> instruction), in order."""
    custom = custom or {}
    styles = []
    for name in names:
        if name in custom:
            styles.append(Style(name, custom[name], name))
        elif ALIASES.get(name, name) in STYLES:
            styles.append(STYLES[ALIASES.get(name, name)])
        else:
            known = sorted({*STYLES, *ALIASES, *custom})
            raise ValueError(f"unknown style {name!r} (known: {', '.join(known)})")
    return styles


def user_turn(style: Style, text: str) -> str:
    return f"{style.instruction}\n\n{text.strip()}"


def accepts_system_turn(tokenizer) -> bool:
    """Whether the chat template renders a system message as given (some templates reject or drop it)."""
    marker = "winnow-system-probe"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "x"}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - templates signal an unsupported role by raising anything
        return False
    return marker in rendered


def build_prompt(tokenizer, style: Style, text: str, system_turn: bool | None = None) -> str:
    """The generation prompt for one segment, ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        return f"{PREAMBLE}\nUSER: {user_turn(style, text)}\nASSISTANT:"
    if system_turn is None:
        system_turn = accepts_system_turn(tokenizer)
    if system_turn:
        messages = [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": user_turn(style, text)}]
    else:
        messages = [{"role": "user", "content": f"{PREAMBLE}\n\n{user_turn(style, text)}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
