"""Real-time voice and video calls with a Thinker-Talker omni model.

Data flow: gateway (WebSocket / WebRTC) -> session (turns, barge-in) -> engine
(thinker process -> talker process -> streaming vocoder) -> back out as 24 kHz speech.
"""

__version__ = "0.1.0"
