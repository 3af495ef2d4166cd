"""The read path (SPEC §18): what goes back to the agents — context, hooks, the MCP server, usage."""
