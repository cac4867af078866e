// The seam for device commands (issue #7, the device and command API).
//
// When that API lands, commandsOf() returns the commands an actuator offers
// (name, current status, last change) from its entity or the device registry,
// and sendCommand() posts one; the entity panel already lists whatever
// commandsOf() returns, with each command's status, and hides the section
// when there are none. Until then no entity has commands.

export function commandsOf(/* entity */) {
  return [];
}

export async function sendCommand(/* tenant, entityId, command */) {
  throw new Error('commands are not available on this server yet');
}
