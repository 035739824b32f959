# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if address :contains "from" "Alice" {
  fileinto "yes";
} else {
  fileinto "no";
}
