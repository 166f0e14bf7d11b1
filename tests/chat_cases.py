"""Conversations whose chat ids are checked against transformers' ``apply_chat_template``, here and in the slim venv."""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse. ünïcødé 😀"},
        {"role": "user", "content": "Hello there 你好 <|im_start|> 🙂"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How  are\nyou?"},
    ],
]
