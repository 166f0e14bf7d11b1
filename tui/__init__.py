"""The terminal chat behind ``edgepack chat``.

``app`` (the App and ``run_chat``), ``screens`` and ``widgets`` use Textual;
``transcript`` (the conversation and ``/save``) and ``commands`` (the slash
commands) do not, so they can be used and tested without a terminal. This
package holds no model logic: it only calls the runtime's ``Loader`` and ``Session``.
"""
