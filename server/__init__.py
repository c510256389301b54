"""mcp-session-manager: a session, admission and deadline layer for MCP tool servers.

```python
from mcp.server.mcpserver import MCPServer
from server import SessionsExtension, load_settings

settings = load_settings("config/default.toml")
sessions = SessionsExtension(settings)
app = MCPServer("my-tools", extensions=[sessions], lifespan=sessions.lifespan)
```
"""

from server.app import build_server
from server.config import ConfigError, LimitsSettings, Settings
from server.config_loader import load_settings
from server.errors import ERROR_META_KEY, EXTENSION_ID, ErrorCode, SessionError
from server.extension import SessionsExtension
from server.metrics import MetricsSnapshot, ShutdownReport
from server.session import Session, SessionState
from server.sessions import SessionManager

__all__ = [
    "ERROR_META_KEY",
    "EXTENSION_ID",
    "ConfigError",
    "ErrorCode",
    "LimitsSettings",
    "MetricsSnapshot",
    "Session",
    "SessionError",
    "SessionManager",
    "SessionState",
    "SessionsExtension",
    "Settings",
    "ShutdownReport",
    "build_server",
    "load_settings",
]
