# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if string :is :comparator "i;ascii-casemap" "Hello" "hello" {
  fileinto "yes";
} else {
  fileinto "no";
}
