"""One producer, many consumers, each with its own queue: job events to whoever watches."""

from __future__ import annotations

import queue
import threading

END = None  # what a consumer's queue holds after the last message


class Broadcast:
    def __init__(self):
        self._lock = threading.Lock()
        self._queues: list[queue.Queue] = []
        self._final: list = []  # once closed: the last messages, for late subscribers
        self._closed = False

    def subscribe(self) -> queue.Queue:
        """A queue of every message published from now on, then `END`; subscribing after
        `close` gives the final messages and `END` at once."""
        consumer: queue.Queue = queue.Queue()
        with self._lock:
            if self._closed:
                for message in self._final:
                    consumer.put(message)
                consumer.put(END)
            else:
                self._queues.append(consumer)
        return consumer

    def unsubscribe(self, consumer: queue.Queue) -> None:
        with self._lock:
            if consumer in self._queues:
                self._queues.remove(consumer)

    def publish(self, message) -> None:
        with self._lock:
            for consumer in self._queues:
                consumer.put(message)

    def close(self, *final) -> None:
        """Publishes the `final` messages, then ends every queue."""
        with self._lock:
            self._closed, self._final = True, list(final)
            consumers, self._queues = self._queues, []
        for consumer in consumers:
            for message in final:
                consumer.put(message)
            consumer.put(END)
