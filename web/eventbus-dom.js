// eventbus-dom.js: a one-way flow between the DOM and the bus, without a framework.
//
// Up: components dispatch ordinary bubbling CustomEvents (`new CustomEvent("note.added",
// {bubbles: true, detail: {...}})`). A root element forwards the ones named as domain events to
// the bus as events of that type. Down: every event the bus delivers is dispatched to the root as
// a `bus:event` CustomEvent and handed to `render`, which updates components. Components never
// change shared state themselves: what they show is what came back from the bus, so every open
// page shows the same thing.

/**
 * @param {Element} root
 * @param {import("./eventbus.js").EventBus} bus
 * @param {object} options
 *   channel: the channel both ways
 *   domainEvents: the CustomEvent names forwarded to the bus
 *   toEvent(domEvent): the bus event for a DOM event (default: {type, key: detail.key, data: detail})
 *   render(event): called for each delivered event, in seq order
 *   after, compact: history to start from (default: the whole compacted backlog)
 * @returns {{ subscription, stop() }}
 */
export function bridge(root, bus, options) {
  const { channel, domainEvents, render } = options;
  const toEvent =
    options.toEvent ??
    ((e) => ({ type: e.type, key: e.detail?.key, data: e.detail ?? null, deleted: e.detail?.deleted || undefined }));
  const forward = (domEvent) => {
    domEvent.stopPropagation();
    const event = { channel, ...toEvent(domEvent) };
    bus.publish(event).catch((error) => {
      root.dispatchEvent(new CustomEvent("bus:refused", { detail: { event, error } }));
    });
  };
  for (const name of domainEvents) root.addEventListener(name, forward);
  const subscription = bus.subscribe(
    channel,
    (event) => {
      root.dispatchEvent(new CustomEvent("bus:event", { detail: event }));
      render?.(event);
    },
    { after: options.after ?? 0, compact: options.compact ?? true },
  );
  return {
    subscription,
    stop() {
      for (const name of domainEvents) root.removeEventListener(name, forward);
      subscription.unsubscribe();
    },
  };
}

/** Dispatches a bubbling domain event from `element`. */
export function emit(element, name, detail) {
  element.dispatchEvent(new CustomEvent(name, { bubbles: true, composed: true, detail }));
}
