// Types of eventbus-dom.js, the package's "./dom" entry point.
import type { EventBus, NewEvent, StoredEvent, Subscription } from "./eventbus.js";

export interface BridgeOptions {
  channel: string;
  /** Names of the bubbling CustomEvents forwarded to the bus as events of that type. */
  domainEvents: string[];
  toEvent?: (domEvent: CustomEvent) => Omit<NewEvent, "channel">;
  render?: (event: StoredEvent) => void;
  after?: number;
  compact?: boolean;
}
export function bridge(root: Element, bus: EventBus, options: BridgeOptions): { subscription: Subscription; stop(): void };
export function emit(element: Element, name: string, detail?: unknown): void;
