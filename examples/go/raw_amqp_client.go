// Call a registered gc-fabric function from Go with nothing but amqp091-go: JSON in, JSON out.
//
// It follows docs/asyncapi.yaml (walked through in docs/integration.md): declare our result
// queue, publish a group manifest and one task per call (mandatory, confirmed), then match
// results to calls by task id. The broker login is the gc-user and the AMQP user_id, so the
// same code works on an open broker (guest) and on a secured one (your user, a token).
//
//	go run raw_amqp_client.go -broker-url amqp://alice:TOKEN@host/%2F -endpoint EP_ID \
//	    -function FN_ID '{"args": [1, 2]}' '{"args": [3], "kwargs": {"weight": 2}}'
//
// Prints one JSON line per call, in order, as examples/node/raw_amqp_client.js does; values
// are passed through as the agent wrote them, so integers above 2^53 stay exact. Exits 0
// when every call succeeded, 1 otherwise.
package main

import (
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const protocolVersion = int32(1) // the gc-protocol header: an AMQP integer

// Exactly the arguments of docs/asyncapi.yaml: a redeclare with others is refused.
var resultQueueArguments = amqp.Table{"x-queue-type": "quorum", "x-expires": int64(604800000)}

type outcome struct {
	TaskID string          `json:"task_id"`
	State  string          `json:"state"`
	Value  json.RawMessage `json:"value,omitempty"`
	Error  json.RawMessage `json:"error,omitempty"` // {type, message, traceback}
}

func callAll(brokerURL, endpointID, functionID string, calls []string, timeout time.Duration) ([]outcome, error) {
	parsed, err := url.Parse(brokerURL)
	if err != nil {
		return nil, err
	}
	user, group := parsed.User.Username(), newID()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return nil, err
	}
	// Buffered for every publish: the library queues a basic.return before the basic.ack of
	// the same publish, so once all acks are in, every return is in its channel too.
	returns := ch.NotifyReturn(make(chan amqp.Return, len(calls)+1))
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, len(calls)+1))
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	if err = ch.Confirm(false); err != nil {
		return nil, err
	}
	if err = ch.ExchangeDeclarePassive("gc.tasks", "topic", true, false, false, false, nil); err != nil {
		return nil, fmt.Errorf("exchange gc.tasks is missing (the fabric declares it): %w", err)
	}
	queue := fmt.Sprintf("gc.results.%s.%s", user, group)
	if _, err = ch.QueueDeclare(queue, true, false, false, false, resultQueueArguments); err != nil {
		return nil, err
	}
	defer ch.QueueDelete(queue, false, false, false) //nolint:errcheck // best effort
	if err = ch.QueueBind(queue, user+"."+group, "gc.results", false, nil); err != nil {
		return nil, err
	}
	taskIDs := make([]string, len(calls))
	for i := range calls {
		taskIDs[i] = newID()
	}
	manifest, _ := json.Marshal(map[string]any{"task_group_id": group, "endpoint_id": endpointID,
		"user": user, "task_ids": taskIDs, "submitted": float64(time.Now().UnixMilli()) / 1000})
	publish := []func() error{func() error {
		return ch.Publish("gc.events", "group."+group+".submitted", false, false, amqp.Publishing{
			ContentType: "application/json", DeliveryMode: amqp.Persistent, UserId: user, Body: manifest,
			Headers: amqp.Table{"gc-protocol": protocolVersion, "gc-event": "group-manifest"}})
	}}
	for i, call := range calls {
		taskID, body := taskIDs[i], []byte(call)
		publish = append(publish, func() error {
			return ch.Publish("gc.tasks", endpointID, true, false, amqp.Publishing{
				ContentType: "application/json", DeliveryMode: amqp.Persistent, UserId: user,
				MessageId: taskID, CorrelationId: group, Body: body,
				Headers: amqp.Table{"gc-protocol": protocolVersion, "gc-function-id": functionID,
					"gc-endpoint-id": endpointID, "gc-user": user, "gc-task-group": group,
					"gc-python": "", "gc-serializer": "json 1"}})
		})
	}
	// Each publish is confirmed before the next goes: amqp091-go before 1.8.0 (Debian 12 has
	// 1.5.0) can lose a confirm that arrives out of order, as a returned task's does ahead of
	// the manifest's, while the next publish is under way (its issue 182).
	deadline := time.After(timeout)
	for _, send := range publish {
		if err = send(); err != nil {
			return nil, err
		}
		select {
		case confirmed, open := <-confirms:
			if !open { // e.g. 403 ACCESS_REFUSED: an endpoint this login may not use
				return nil, fmt.Errorf("the broker closed the channel: %v", <-closed)
			}
			if !confirmed.Ack {
				return nil, fmt.Errorf("the broker refused publish %d (basic.nack)", confirmed.DeliveryTag)
			}
		case <-deadline:
			return nil, fmt.Errorf("the broker confirmed no publish within %s", timeout)
		}
	}
	outcomes := map[string]outcome{}
	for len(returns) > 0 {
		returned := <-returns
		outcomes[returned.MessageId] = outcome{TaskID: returned.MessageId, State: "returned"}
	}
	if err = collect(ch, queue, taskIDs, outcomes, timeout); err != nil {
		return nil, err
	}
	ordered := make([]outcome, len(taskIDs))
	for i, id := range taskIDs {
		ordered[i] = outcomes[id]
	}
	return ordered, nil
}

// collect consumes results until every task has an outcome; the first result per task id wins.
func collect(ch *amqp.Channel, queue string, taskIDs []string, outcomes map[string]outcome, timeout time.Duration) error {
	waiting := map[string]bool{}
	for _, id := range taskIDs {
		if _, done := outcomes[id]; !done {
			waiting[id] = true
		}
	}
	deliveries, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		return err
	}
	deadline := time.After(timeout)
	for len(waiting) > 0 {
		select {
		case d, open := <-deliveries:
			if !open {
				return fmt.Errorf("the broker closed the channel while %d results were due", len(waiting))
			}
			if waiting[d.MessageId] {
				delete(waiting, d.MessageId)
				outcomes[d.MessageId] = toOutcome(d)
			}
			d.Ack(false) // after handling it: an unacked result comes back on reconnect
		case <-deadline:
			return fmt.Errorf("no result within %s for %d tasks", timeout, len(waiting))
		}
	}
	return nil
}

func toOutcome(d amqp.Delivery) outcome {
	state, _ := d.Headers["gc-state"].(string)
	if state == "success" {
		return outcome{TaskID: d.MessageId, State: state, Value: d.Body}
	}
	return outcome{TaskID: d.MessageId, State: state, Error: d.Body} // failed or cancelled
}

func newID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func main() {
	defaultURL := os.Getenv("GC_BROKER_URL")
	if defaultURL == "" {
		defaultURL = "amqp://guest:guest@127.0.0.1:5672/%2F"
	}
	brokerURL := flag.String("broker-url", defaultURL, "AMQP URL; its user is the gc-user")
	endpoint := flag.String("endpoint", "", "endpoint id")
	function := flag.String("function", "", "function id")
	timeout := flag.Duration("timeout", 60*time.Second, "how long to wait for results")
	flag.Parse()
	if *endpoint == "" || *function == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: raw_amqp_client -endpoint ID -function ID CALL_JSON...")
		os.Exit(2)
	}
	outcomes, err := callAll(*brokerURL, *endpoint, *function, flag.Args(), *timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	code := 0
	for _, o := range outcomes {
		line, _ := json.Marshal(o)
		fmt.Println(string(line))
		if o.State != "success" {
			code = 1
		}
	}
	os.Exit(code)
}
